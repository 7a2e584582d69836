"""The forward primitives of draft heads, once, in numpy (float32).

Medusa's residual stack and its gradient, the EAGLE decoder layer's parts (RMS norm,
rotary position embedding, SiLU-gated feed-forward, attention over a KV cache) and the
log-softmax helpers that proposing, training and evaluation share.
"""

from __future__ import annotations

import math

import numpy as np


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 + 0.5 * np.tanh(0.5 * z)  # = 1 / (1 + exp(-z)), without overflow


def silu(z: np.ndarray) -> np.ndarray:
    return z * sigmoid(z)


def logsumexp(z: np.ndarray, axis: int = -1) -> np.ndarray:
    """log(sum(exp(z))) along `axis` (dropped), without overflow."""
    m = z.max(axis=axis, keepdims=True)
    return np.log(np.exp(z - m).sum(axis=axis)) + np.squeeze(m, axis=axis)


def log_softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    return z - np.expand_dims(logsumexp(z, axis), axis)


def top_k(z: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest entries of each row of z (..., V), best first: (indices, values)."""
    top = np.argpartition(z, -k, axis=-1)[..., -k:]                # unordered
    zt = np.take_along_axis(z, top, axis=-1)
    order = np.argsort(-zt, axis=-1, kind="stable")
    return np.take_along_axis(top, order, axis=-1), np.take_along_axis(zt, order, axis=-1)


def cosine_lr(lr: float, step: int, total: int) -> float:
    """The learning rate at `step` of `total`: lr decayed to 10% over the run (cosine)."""
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / total)))


# ---------------------------------------------------------------------------------------
# Medusa: r_0 = x, r_{l+1} = r_l + SiLU(W_l r_l + b_l), every head at once
# ---------------------------------------------------------------------------------------


def residual_stack(x: np.ndarray, w: np.ndarray, b: np.ndarray
                   ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """x (B, H); w (nh, L, H, H); b (nh, L, H). Returns the states r_0..r_L, each
    (nh, B, H), and the pre-activations z_0..z_{L-1} (what the gradient needs)."""
    nh, n_layers, d, _ = w.shape
    bsz = x.shape[0]
    rs, zs = [np.broadcast_to(x, (nh, bsz, d))], []
    for l in range(n_layers):
        if l == 0:  # every head reads x: one (B, H) @ (H, nh*H) product
            z = (x @ w[:, 0].reshape(nh * d, d).T).reshape(bsz, nh, d).transpose(1, 0, 2)
        else:
            z = np.matmul(rs[-1], w[:, l].transpose(0, 2, 1))
        z = z + b[:, l][:, None, :]
        zs.append(z)
        rs.append(rs[-1] + silu(z))
    return rs, zs


def residual_stack_backward(dr: np.ndarray, w: np.ndarray, rs: list[np.ndarray],
                            zs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Gradients (of w, of b) given dr = d(loss)/d(r_L) (nh, B, H)."""
    gw, gb = np.zeros_like(w), np.zeros(w.shape[:3], dtype=w.dtype)
    for l in reversed(range(w.shape[1])):
        z = zs[l]
        sig = sigmoid(z)
        dz = dr * sig * (1 + z * (1 - sig))                              # SiLU'(z)
        gw[:, l] = np.matmul(dz.transpose(0, 2, 1), rs[l])               # (nh, H, H)
        gb[:, l] = dz.sum(axis=1)
        if l:
            dr = dr + np.matmul(dz, w[:, l])
    return gw, gb


def softmax_xent(logits: np.ndarray, y: np.ndarray, grad: bool
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """Cross-entropy of logits (..., V) against rows y (...) (-1: no label, loss 0):
    (loss (...), d(sum loss)/d(logits) when `grad`)."""
    valid = y >= 0
    yc = np.maximum(y, 0)[..., None]
    lse = logsumexp(logits)
    nll = (lse - np.take_along_axis(logits, yc, axis=-1)[..., 0]) * valid
    if not grad:
        return nll, None
    d = np.exp(logits - lse[..., None])                                  # softmax
    np.put_along_axis(d, yc, np.take_along_axis(d, yc, axis=-1) - 1, axis=-1)
    return nll, d * valid[..., None]


# ---------------------------------------------------------------------------------------
# The EAGLE decoder layer's parts (llama.cpp's conventions)
# ---------------------------------------------------------------------------------------


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rope(x: np.ndarray, positions: np.ndarray, base: float) -> np.ndarray:
    """Rotary embedding as llama.cpp's LLAMA_ROPE_TYPE_NORM: x (n, heads, d) rotated in
    adjacent pairs (x[2i], x[2i+1]) by position * base^(-2i/d) (its converter permutes
    HF's q/k rows so that this equals HF's rotate_half on the original weights)."""
    d = x.shape[-1]
    theta = positions[:, None].astype(np.float64) * base ** (-np.arange(0, d, 2) / d)  # (n, d/2)
    cos = np.cos(theta).astype(np.float32)[:, None, :]
    sin = np.sin(theta).astype(np.float32)[:, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


def swiglu(x: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray) -> np.ndarray:
    """down(SiLU(gate x) * up x); weights (out, in) numpy order."""
    return (silu(x @ gate.T) * (x @ up.T)) @ down.T


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """q (n, heads, d); k, v (m, kv_heads, d); mask (n, m) True where query i sees key j.
    Grouped heads: query head h reads kv head h // (heads / kv_heads). Returns (n, heads*d)."""
    n, n_head, d = q.shape
    group = n_head // k.shape[1]
    kk = np.repeat(k, group, axis=1).transpose(1, 2, 0)                  # (heads, d, m)
    vv = np.repeat(v, group, axis=1).transpose(1, 0, 2)                  # (heads, m, d)
    s = np.matmul(q.transpose(1, 0, 2), kk) / np.sqrt(d)                 # (heads, n, m)
    s = np.where(mask[None], s, -np.inf)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return np.matmul(p, vv).transpose(1, 0, 2).reshape(n, n_head * d)
