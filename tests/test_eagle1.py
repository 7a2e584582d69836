"""EAGLE-1/2 drafts (ggspec's eagle1 GGUF): SafeAILab checkpoints convert and compute what
an independent torch forward of the checkpoint computes; malformed files give one-line
errors; the drafter's features are the target's last hidden states. (Exactness in the
engine, greedy and sampled: test_eagle_engine.py's `eagle1` engine.)"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
from safetensors.numpy import save_file

from ggspec import BackendConfig, Engine
from ggspec.errors import ModelFileError
from ggspec.heads.convert import convert_eagle
from ggspec.heads.eagle1 import load_eagle1, open_eagle
from ggspec.heads.target import read_target
from test_eagle import _rewrite
from test_engine import random_prompt
from tinymodels import write_tiny_eagle1

CFG = BackendConfig(n_ctx=512, n_batch=64, n_threads=1)
HEADS, KV, FF = 4, 2, 96


def checkpoint(tmp_path, target_path, *, biases=True, fmt="safetensors", seed=0):
    """A random SafeAILab EAGLE-1/2 checkpoint for the tiny target: config.json (the
    target's Llama config with one layer) and its state dict, as cnets1.Model saves it."""
    info = read_target(target_path)
    h, n_vocab = info.fingerprint.embedding_length, info.n_vocab
    hd = h // HEADS
    rng = np.random.default_rng(seed)

    def lin(o, i, gain=1.0):
        return (rng.standard_normal((o, i)) * gain / np.sqrt(i)).astype(np.float32)

    def vec(n):
        return (0.1 * rng.standard_normal(n)).astype(np.float32)

    state = {"fc.weight": lin(h, 2 * h), "embed_tokens.weight": rng.standard_normal((n_vocab, h)).astype(np.float32),
             "layers.0.self_attn.q_proj.weight": lin(HEADS * hd, h, 2.0),
             "layers.0.self_attn.k_proj.weight": lin(KV * hd, h), "layers.0.self_attn.v_proj.weight": lin(KV * hd, h),
             "layers.0.self_attn.o_proj.weight": lin(h, HEADS * hd),
             "layers.0.post_attention_layernorm.weight": (1 + vec(h)).astype(np.float32),
             "layers.0.mlp.gate_proj.weight": lin(FF, h), "layers.0.mlp.up_proj.weight": lin(FF, h),
             "layers.0.mlp.down_proj.weight": lin(h, FF)}
    if biases:
        state.update({"fc.bias": vec(h), "layers.0.self_attn.q_proj.bias": vec(HEADS * hd),
                      "layers.0.self_attn.k_proj.bias": vec(KV * hd), "layers.0.self_attn.v_proj.bias": vec(KV * hd)})
    config = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1, "hidden_size": h,
              "num_attention_heads": HEADS, "num_key_value_heads": KV, "intermediate_size": FF,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "vocab_size": n_vocab, "bias": biases,
              "qkv_bias": biases}
    d = tmp_path / f"eagle1-{fmt}"
    d.mkdir()
    if fmt == "bin":
        torch = pytest.importorskip("torch")
        torch.save({k: torch.from_numpy(v) for k, v in state.items()}, d / "pytorch_model.bin")
    else:
        save_file(state, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(config))
    return d, state


def torch_forward(state, target_out, tokens, feats, eps=1e-5, base=10000.0):
    """The checkpoint's own maths as SafeAILab's cnets1.Model and HF Llama compute them
    (rotate_half RoPE on the unpermuted q/k, causal attention, no input norm, the target's
    lm_head on the layer output), in float64 torch."""
    torch = pytest.importorskip("torch")
    s = {k: torch.from_numpy(v).double() for k, v in state.items()}
    lin = torch.nn.functional.linear
    n, h = feats.shape
    hd = h // HEADS
    x = lin(torch.cat([s["embed_tokens.weight"][torch.from_numpy(tokens)], torch.from_numpy(feats).double()], -1),
            s["fc.weight"], s.get("fc.bias"))

    def proj(name, heads):
        return lin(x, s[f"layers.0.self_attn.{name}.weight"], s.get(f"layers.0.self_attn.{name}.bias")
                   ).view(n, heads, hd).transpose(0, 1)                  # (heads, n, hd)

    inv = 1.0 / base ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.outer(torch.arange(n, dtype=torch.float64), inv)
    emb = torch.cat([ang, ang], -1)

    def rot(t):
        return t * emb.cos() + torch.cat([-t[..., hd // 2:], t[..., :hd // 2]], -1) * emb.sin()

    q, k, v = rot(proj("q_proj", HEADS)), rot(proj("k_proj", KV)), proj("v_proj", KV)
    k, v = k.repeat_interleave(HEADS // KV, 0), v.repeat_interleave(HEADS // KV, 0)
    a = torch.nn.functional.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True)[0]
    y = x + lin(a.transpose(0, 1).reshape(n, h), s["layers.0.self_attn.o_proj.weight"])
    m = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps) * s["layers.0.post_attention_layernorm.weight"]
    gate, up = lin(m, s["layers.0.mlp.gate_proj.weight"]), lin(m, s["layers.0.mlp.up_proj.weight"])
    mlp = lin(torch.nn.functional.silu(gate) * up, s["layers.0.mlp.down_proj.weight"])
    return ((y + mlp) @ torch.tensor(target_out, dtype=torch.float64).T).numpy()


@pytest.mark.parametrize("biases,fmt", [(True, "safetensors"), (False, "safetensors"), (True, "bin")])
def test_converted_checkpoint_computes_what_torch_computes(tmp_path, target_path, biases, fmt):
    src, state = checkpoint(tmp_path, target_path, biases=biases, fmt=fmt)
    out = convert_eagle(src, target_path, tmp_path / "e1.gguf", dtype="f32")
    heads = open_eagle(out, target_path)
    assert heads.features == "hidden" and heads.vocab_size == read_target(target_path).n_vocab
    assert (heads.w.bq is not None) is biases and (heads.w.fc_bias is not None) is biases
    np.testing.assert_array_equal(heads.w.wv, state["layers.0.self_attn.v_proj.weight"])
    assert not np.array_equal(heads.w.wq, state["layers.0.self_attn.q_proj.weight"])  # permuted
    rng = np.random.default_rng(1)
    n = 7
    tokens = rng.integers(0, heads.embd.shape[0], n)
    feats = rng.standard_normal((n, heads.cfg.hidden)).astype(np.float32)
    z, pre = heads.step(heads.new_cache(8), tokens, heads.fuse(feats), np.arange(n), np.tri(n, dtype=bool))
    want = torch_forward(state, heads.out, tokens, feats)
    assert np.abs(z - want).max() < 1e-4 * np.abs(want).max()
    assert pre.shape == (n, heads.cfg.hidden)


def test_bad_checkpoints_and_files_fail_with_one_line(tmp_path, target_path):
    src, state = checkpoint(tmp_path, target_path)
    del state["layers.0.mlp.up_proj.weight"]
    save_file(state, str(src / "model.safetensors"))
    with pytest.raises(ModelFileError, match="lacks ffn_up"):
        convert_eagle(src, target_path, tmp_path / "x.gguf")
    good = write_tiny_eagle1(tmp_path / "good.gguf", target_path)
    S, U = gguf.GGUFValueType.STRING, gguf.GGUFValueType.UINT32
    cases = [(dict(drop_tensor="blk.0.ffn_up.weight"), "missing tensor blk.0.ffn_up.weight"),
             (dict(drop_tensor="blk.0.attn_k.bias"), "all three or none"),
             (dict(tensor=("fc.weight", np.zeros((64, 10), np.float32))), r"fc.weight has shape \(64, 10\)"),
             (dict(drop_key="eagle1.target.vocab_hash"), "missing metadata key eagle1.target.vocab_hash"),
             (dict(set_key=("eagle1.target.vocab_hash", "0" * 64, S)), "made for another target"),
             (dict(set_key=("eagle1.attention.head_count", 5, U)), "must split into 5 heads")]
    for i, (change, message) in enumerate(cases):
        bad = _rewrite(good, tmp_path / f"bad{i}.gguf", **change)
        with pytest.raises(ModelFileError, match=message) as e:
            load_eagle1(bad, target_path)
        assert "\n" not in str(e.value) and str(bad) in str(e.value)


def test_eagle1_draft_reads_the_target_s_last_hidden_states(target_path, tmp_path):
    """The features the drafter takes from a decode are the target's output-layer inputs
    at those positions, as one-token decodes of the same text compute them."""
    from ggspec.backend import Context, Model
    from ggspec.controller import CostModel
    from ggspec.drafters.eagle import EagleDrafter
    from ggspec.heads.eagle_paths import NumpyPath
    tokens = random_prompt(93)[:12]
    n = len(tokens) - 1
    heads = load_eagle1(write_tiny_eagle1(tmp_path / "e1.gguf", target_path), target_path)
    with Model(target_path, CFG) as model, Context(model, CFG, embeddings=True) as batch, \
            Context(model, CFG, embeddings=True) as single:
        batch.decode(tokens[:n], list(range(n)), None, np.zeros(n, dtype=np.int8))
        drafter = EagleDrafter(batch, CostModel(), NumpyPath(heads, 64), 16)
        drafter.prepare(tokens)  # the rows before the pending token: all n
        (positions, features), = drafter._pending
        want = []
        for p in range(n):
            single.decode(tokens[p:p + 1], [p], None, np.zeros(1, dtype=np.int8))
            want.append(single.hidden(1)[0].copy())
    np.testing.assert_array_equal(positions, np.arange(n))
    np.testing.assert_allclose(features, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())


def test_eagle1_runs_in_numpy_only_and_from_the_cli(tmp_path, target_path):
    import json as js

    from test_cli import TINY, greedy_tokens, invoke
    path = write_tiny_eagle1(tmp_path / "e1.gguf", target_path)
    with pytest.raises(ValueError, match="numpy only"):
        Engine(target_path, None, target_config=CFG, eagle=path, eagle_backend="llama")
    got = invoke("run", "-m", target_path, "--no-draft", "--eagle", path, "--tree-nodes", 6,
                 *TINY, "--method", "eagle", "-t", 0, "-n", 12, "--json", "hello world")
    assert got.exit_code == 0, got.output
    data = js.loads(got.stdout)
    assert data["stats"]["method"] == "eagle" and data["stats"]["draft_tokens"] > 0
    assert data["tokens"] == greedy_tokens(target_path, [{"role": "user", "content": "hello world"}], 12)


def test_cli_converts_an_eagle1_checkpoint(tmp_path, target_path):
    from click.testing import CliRunner

    from ggspec.cli import cli
    src, _ = checkpoint(tmp_path, target_path)
    r = CliRunner().invoke(cli, ["convert", "eagle", str(src), str(tmp_path / "c.gguf"), "-m", target_path])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(tmp_path / "c.gguf")
    assert open_eagle(tmp_path / "c.gguf", target_path).features == "hidden"
