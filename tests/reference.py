"""Independent references for exactness tests: plain llama.cpp decoding written directly
against llama-cpp-python's C API, sharing no decoding code with ggspec's engine (the
weights are placed as the engine's load places them, ggspec.weights, so that both run the
same kernels)."""

from __future__ import annotations

from dataclasses import dataclass

import llama_cpp
import numpy as np

from ggspec import weights
from ggspec.gguffile import read_header

# Batched and single-row kernels accumulate in different orders, and which kernels run
# depends on the CPU: a position's logits computed through the cache and through a fresh
# prefill lay up to 1.6e-3 apart on a tiny model whose logits reach 6 (AVX2, no AVX-512),
# where a wrong cache moves them by 0.1 or more.
NEAR_TIE = 5e-3     # target top-2 logit gap below which that rounding may flip the argmax
SAME_LOGITS = 2e-3  # of the logits' largest magnitude: how far apart the two may lie


@dataclass
class Reference:
    tokens: list[int]        # greedy continuation, without the end-of-generation token
    gaps: list[float]        # top-2 logit gap at each generated position (and at the EOG)
    logits: list[np.ndarray]  # the target's logits at each generated position


def greedy_reference(model_path: str, prompt: list[int], n: int, n_ctx: int = 512,
                     stop_at_eog: bool = True, forced: list[int] = (), n_threads: int = 1,
                     ignore_eog: bool = False) -> Reference:
    """Greedy decoding one token per llama_decode (after a batched prompt). With `forced`,
    those tokens are fed one per decode first (teacher forcing), then n are generated.
    With `ignore_eog`, every end-of-generation token's logit is -inf (in `logits` too)."""
    mparams = llama_cpp.llama_model_default_params()
    keep = weights.place(mparams, read_header(model_path))  # the kernels the engine's load chose
    model = llama_cpp.llama_model_load_from_file(model_path.encode(), mparams)
    del keep
    assert model, model_path
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = n_ctx
    cparams.n_batch = n_ctx
    cparams.n_threads = cparams.n_threads_batch = n_threads
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    vocab = llama_cpp.llama_model_get_vocab(model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    eog = [t for t in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t)] if ignore_eog else []
    out = Reference([], [], [])
    try:
        arr = (llama_cpp.llama_token * len(prompt))(*prompt)
        assert llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(arr, len(prompt))) == 0
        for token in forced:
            one = (llama_cpp.llama_token * 1)(token)
            assert llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(one, 1)) == 0
        for _ in range(n):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,)).copy()
            logits[eog] = -np.inf
            top2 = np.sort(logits)[-2:]
            token = int(np.argmax(logits))
            out.gaps.append(float(top2[1] - top2[0]))
            out.logits.append(logits)
            if stop_at_eog and llama_cpp.llama_vocab_is_eog(vocab, token):
                break
            out.tokens.append(token)
            one = (llama_cpp.llama_token * 1)(token)
            assert llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(one, 1)) == 0
    finally:
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
    return out


def first_divergence(got: list[int], ref: Reference, near_tie: float = NEAR_TIE) -> str | None:
    """None when `got` equals the reference (up to a near-tie); else a description with the
    position and the target's top-2 logit gap there. A divergence at a near-tie is excused
    (everything after it may legitimately differ)."""
    for i, (a, b) in enumerate(zip(got, ref.tokens)):
        if a != b:
            if ref.gaps[i] < near_tie:
                return None
            return f"position {i}: got {a}, reference {b}, target top-2 gap {ref.gaps[i]:.5f}"
    n = min(len(got), len(ref.tokens))
    if len(got) != len(ref.tokens) and not (n < len(ref.gaps) and ref.gaps[n] < near_tie):
        return f"lengths differ: got {len(got)}, reference {len(ref.tokens)}"
    return None


def assert_same_logits(got: np.ndarray, want: np.ndarray, **kwargs) -> None:
    """One position's logits from two evaluations of the same tokens agree within the
    kernels' rounding (SAME_LOGITS)."""
    np.testing.assert_allclose(got, want, atol=SAME_LOGITS * np.abs(want).max(), **kwargs)


def warp(logits: np.ndarray, cfg) -> np.ndarray:
    """ggspec's warped distribution of one row as a dense (n_vocab,) vector."""
    from ggspec.sampling import distribution
    ids, p = distribution(logits, cfg)
    dense = np.zeros(logits.shape[-1])
    dense[ids] = p
    return dense


def sample(probs: np.ndarray, rng) -> int:
    """Inverse CDF over the positive entries of dense weights, with one rng.random(): what
    drawing from a distribution must give for the same random number."""
    support = np.flatnonzero(probs > 0)
    cdf = probs[support].cumsum()
    return int(support[min(cdf.searchsorted(rng.random() * cdf[-1], side="right"), support.size - 1)])


def sparse(q: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Dense draft distributions (k, n_vocab) as the drafters hand them over: (ids, probabilities) per row."""
    return [(np.flatnonzero(row), row[np.flatnonzero(row)]) for row in np.asarray(q, dtype=np.float64)]
