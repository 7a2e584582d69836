"""EAGLE-3 checkpoints (SpecForge `midlayer.*` and speculators `layers.0.*` layouts, written
with the safetensors package) to eagle3 GGUF: tensors round-trip, and the converted draft
computes what an independent HF-convention forward of the checkpoint computes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

from ggspec.cli import cli
from ggspec.errors import ModelFileError
from ggspec.heads.convert import convert_eagle
from ggspec.heads.eagle import load_eagle
from ggspec.heads.target import read_target

H, HEADS, KV, FF, V = 64, 4, 2, 96, 50


def checkpoint(tmp_path, target_path, layout="specforge", norm_before_residual=False, seed=0):
    n_vocab, th = read_target(target_path).n_vocab, 64
    rng = np.random.default_rng(seed)

    def lin(o, i, gain=1.0):
        return (rng.standard_normal((o, i)) * gain / np.sqrt(i)).astype(np.float32)

    def norm(n):
        return (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    hd = H // HEADS
    layer = {"input_layernorm.weight": norm(H), "hidden_norm.weight": norm(H),
             "self_attn.q_proj.weight": lin(HEADS * hd, 2 * H, 2.0),
             "self_attn.k_proj.weight": lin(KV * hd, 2 * H), "self_attn.v_proj.weight": lin(KV * hd, 2 * H),
             "self_attn.o_proj.weight": lin(H, HEADS * hd), "post_attention_layernorm.weight": norm(H),
             "mlp.gate_proj.weight": lin(FF, H), "mlp.up_proj.weight": lin(FF, H),
             "mlp.down_proj.weight": lin(H, FF)}
    ids = np.sort(rng.choice(n_vocab, V, replace=False))
    t2d = np.zeros(n_vocab, bool)
    t2d[ids] = True
    prefix = "midlayer." if layout == "specforge" else "layers.0."
    state = {prefix + k: v for k, v in layer.items()}
    state.update({"fc.weight": lin(H, 3 * th), "norm.weight": norm(H), "lm_head.weight": lin(V, H, 4.0),
                  "embed_tokens.weight": rng.standard_normal((n_vocab, H)).astype(np.float32),
                  "d2t": (ids - np.arange(V)).astype(np.int64), "t2d": t2d})
    config = {"num_hidden_layers": 1, "hidden_size": H, "num_attention_heads": HEADS,
              "num_key_value_heads": KV, "intermediate_size": FF, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "draft_vocab_size": V, "vocab_size": n_vocab,
              "eagle_aux_hidden_state_layer_ids": [0, 1, 1],
              "norm_before_residual": norm_before_residual}
    if layout == "speculators":  # the layer config nested, as Red Hat's speculators writes it
        config = {"speculators_model_type": "eagle3", "draft_vocab_size": V,
                  "norm_before_residual": norm_before_residual, "target_hidden_size": th,
                  "transformer_layer_config": {k: v for k, v in config.items()
                                               if k not in ("draft_vocab_size", "norm_before_residual")}}
    d = tmp_path / layout
    d.mkdir()
    save_file(state, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(config))
    return d, state, ids


def hf_forward(state, prefix, tokens, feats, norm_before_residual, eps=1e-5, base=10000.0):
    """The checkpoint's own maths in HF's conventions (rotate_half RoPE on unpermuted q/k,
    causal attention over the rows): logits over the draft vocabulary, float64."""
    s = {k: v.astype(np.float64) for k, v in state.items() if v.dtype != bool}
    L = lambda k: s[prefix + k]  # noqa: E731
    rms = lambda x, w: x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w  # noqa: E731
    n, hd = len(tokens), H // HEADS
    g = feats @ s["fc.weight"].T
    e = rms(s["embed_tokens.weight"][tokens], L("input_layernorm.weight"))
    gn = rms(g, L("hidden_norm.weight"))
    x = np.concatenate([e, gn], 1)
    inv = base ** (-np.arange(0, hd, 2) / hd)
    ang = np.arange(n)[:, None] * np.concatenate([inv, inv])[None]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]

    def rot(t):
        half = t.shape[-1] // 2
        return t * cos + np.concatenate([-t[..., half:], t[..., :half]], -1) * sin

    q = rot((x @ L("self_attn.q_proj.weight").T).reshape(n, HEADS, hd))
    k = np.repeat(rot((x @ L("self_attn.k_proj.weight").T).reshape(n, KV, hd)), HEADS // KV, 1)
    v = np.repeat((x @ L("self_attn.v_proj.weight").T).reshape(n, KV, hd), HEADS // KV, 1)
    sc = np.einsum("ihd,jhd->hij", q, k) / np.sqrt(hd) + np.triu(np.full((n, n), -np.inf), 1)
    p = np.exp(sc - sc.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    a = np.einsum("hij,jhd->ihd", p, v).reshape(n, H) @ L("self_attn.o_proj.weight").T
    f = a + (gn if norm_before_residual else g)
    m = rms(f, L("post_attention_layernorm.weight"))
    up = m @ L("mlp.gate_proj.weight").T
    pre = f + ((up / (1 + np.exp(-up))) * (m @ L("mlp.up_proj.weight").T)) @ L("mlp.down_proj.weight").T
    return rms(pre, s["norm.weight"]) @ s["lm_head.weight"].T


@pytest.mark.parametrize("layout,nbr", [("specforge", False), ("speculators", True)])
def test_converted_checkpoint_round_trips_and_computes_the_same(tmp_path, target_path, layout, nbr):
    src, state, ids = checkpoint(tmp_path, target_path, layout, nbr)
    out = convert_eagle(src, target_path, tmp_path / "e.gguf", dtype="f32")
    heads = load_eagle(out, target_path)
    prefix = "midlayer." if layout == "specforge" else "layers.0."
    assert heads.cfg.target_layers == (0, 1, 1) and heads.cfg.norm_before_residual is nbr
    np.testing.assert_array_equal(heads.d2t, ids)                     # offsets -> target ids
    np.testing.assert_array_equal(heads.w.fc, state["fc.weight"])
    np.testing.assert_array_equal(heads.w.wv, state[prefix + "self_attn.v_proj.weight"])
    np.testing.assert_array_equal(heads.out, state["lm_head.weight"])
    assert not np.array_equal(heads.w.wq, state[prefix + "self_attn.q_proj.weight"])  # permuted
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, heads.embd.shape[0], 6)
    feats = rng.standard_normal((6, 3 * 64)).astype(np.float32)
    z, _ = heads.step(heads.new_cache(8), tokens, heads.fuse(feats), np.arange(6),
                      np.tril(np.ones((6, 6), bool)))
    want = hf_forward(state, prefix, tokens, feats, nbr)
    assert np.abs(z - want).max() < 1e-3 * np.abs(want).max()


def test_cli_convert_and_bad_checkpoints(tmp_path, target_path):
    src, state, _ = checkpoint(tmp_path, target_path)
    r = CliRunner().invoke(cli, ["convert", "eagle", str(src), str(tmp_path / "c.gguf"), "-m", target_path])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == str(tmp_path / "c.gguf")
    load_eagle(tmp_path / "c.gguf", target_path)
    del state["midlayer.hidden_norm.weight"]
    save_file(state, str(src / "model.safetensors"))
    r = CliRunner().invoke(cli, ["convert", "eagle", str(src), str(tmp_path / "d.gguf"), "-m", target_path])
    assert r.exit_code == 1 and "lacks attn_norm_2" in r.output and r.output.count("\n") == 1
    state["midlayer.mlp.up_proj.weight"] = state["midlayer.mlp.up_proj.weight"][:10]
    state["midlayer.hidden_norm.weight"] = state["norm.weight"]
    save_file(state, str(src / "model.safetensors"))
    with pytest.raises(ModelFileError, match=r"tensor blk.0.ffn_up.weight has shape \(10, 64\)"):
        convert_eagle(src, target_path, tmp_path / "e.gguf")
    assert not (tmp_path / "e.gguf").exists()
    with pytest.raises(ModelFileError, match="no config.json"):
        convert_eagle(tmp_path, target_path, tmp_path / "f.gguf")
