"""tools/convert_medusa.py: FasterDecoding Medusa checkpoints to head GGUF files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from ggspec.errors import ModelFileError
from ggspec.heads import load_heads, read_target, silu
from tinymodels import VOCAB
from toolfiles import load_tool

convert_medusa = load_tool("convert_medusa")

H = 64


def medusa_state(n_heads=3, n_layers=1, vocab=VOCAB.n_vocab, seed=0, prefix=""):
    """A checkpoint in Medusa's layout: <i>.<j>.linear.{weight,bias}, <i>.<n_layers>.weight."""
    rng = np.random.default_rng(seed)
    state = {}
    for i in range(n_heads):
        for j in range(n_layers):
            state[f"{prefix}{i}.{j}.linear.weight"] = rng.standard_normal((H, H)).astype(np.float32) / 8
            state[f"{prefix}{i}.{j}.linear.bias"] = rng.standard_normal(H).astype(np.float32) / 8
        state[f"{prefix}{i}.{n_layers}.weight"] = rng.standard_normal((vocab, H)).astype(np.float32)
    return state


def write_safetensors(path: Path, state: dict[str, np.ndarray], dtype: str = "F32") -> Path:
    """The safetensors format by hand (8-byte header size, JSON header, raw data)."""
    header, blobs, offset = {}, [], 0
    for name, a in state.items():
        if dtype == "F16":
            raw = a.astype(np.float16).tobytes()
        elif dtype == "BF16":  # truncate float32 to its high half
            raw = (a.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()
        else:
            raw = a.astype(np.float32).tobytes()
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))
    return path


def reference_logits(state, n_heads, n_layers, x):
    """Medusa's own forward pass: ResBlock(x) = x + SiLU(linear(x)), then the lm head."""
    rows = []
    for i in range(n_heads):
        r = x.astype(np.float64)
        for j in range(n_layers):
            r = r + silu(state[f"{i}.{j}.linear.weight"] @ r + state[f"{i}.{j}.linear.bias"])
        rows.append(state[f"{i}.{n_layers}.weight"] @ r)
    return np.stack(rows)


@pytest.mark.parametrize("n_layers, st_dtype, gguf_dtype, tol", [
    (1, "F32", "f32", 1e-4), (2, "F16", "f16", 2e-2), (1, "BF16", "q8_0", 0.2)])
def test_safetensors_round_trip(tmp_path, target_path, n_layers, st_dtype, gguf_dtype, tol):
    state = medusa_state(n_layers=n_layers)
    ckpt = write_safetensors(tmp_path / "medusa_lm_head.safetensors", state, st_dtype)
    out = tmp_path / "heads.gguf"
    assert convert_medusa.main([str(ckpt), target_path, str(out), "--dtype", gguf_dtype]) == 0
    heads = load_heads(out, target_path)
    assert (heads.n_heads, heads.n_layers, heads.hidden, heads.vocab_size) == (3, n_layers, H, VOCAB.n_vocab)
    assert heads.token_ids is None and not heads.tied
    x = np.random.default_rng(1).standard_normal(H).astype(np.float32)
    ref = reference_logits(state, 3, n_layers, x)
    got = heads.logits(x[None])[0]
    assert np.abs(got - ref).max() <= tol * np.abs(ref).max()
    if st_dtype == "F32":
        np.testing.assert_array_equal(heads.res_weight[2, 0], state["2.0.linear.weight"])
        ids, _ = heads.propose(x, 4)
        np.testing.assert_array_equal(ids, np.argsort(-ref, axis=1)[:, :4])


def test_prefixed_keys_small_vocab_and_tied(tmp_path, target_path):
    """Medusa-2 style `medusa_head.` keys; an lm head over the first 100 ids maps through
    token_ids; --tied swaps in the target's output rows."""
    state = medusa_state(vocab=100, prefix="medusa_head.")
    ckpt = write_safetensors(tmp_path / "m.safetensors", state)
    heads = convert_medusa.convert(ckpt, target_path, tmp_path / "a.gguf", dtype="f32")
    np.testing.assert_array_equal(load_heads(tmp_path / "a.gguf", target_path).token_ids, np.arange(100))
    assert heads.vocab_size == 100
    convert_medusa.convert(ckpt, target_path, tmp_path / "b.gguf", dtype="f32", tied=True)
    tied = load_heads(tmp_path / "b.gguf", target_path)
    assert tied.tied and tied.vocab_size == VOCAB.n_vocab
    np.testing.assert_array_equal(tied.out_weight, read_target(target_path).output_rows())


def test_padded_vocab_is_cut_to_the_target(tmp_path, target_path):
    state = medusa_state(n_heads=1, vocab=VOCAB.n_vocab + 5)
    ckpt = write_safetensors(tmp_path / "m.safetensors", state)
    heads = convert_medusa.convert(ckpt, target_path, tmp_path / "h.gguf", dtype="f32")
    assert heads.vocab_size == VOCAB.n_vocab and heads.token_ids is None


def test_bad_checkpoints(tmp_path, target_path, capsys):
    state = medusa_state()
    del state["1.0.linear.bias"]
    ckpt = write_safetensors(tmp_path / "m.safetensors", state)
    with pytest.raises(ValueError, match=r"missing 1\.0\.linear\.bias"):
        convert_medusa.convert(ckpt, target_path, tmp_path / "h.gguf")
    assert convert_medusa.main([str(ckpt), target_path, str(tmp_path / "h.gguf")]) == 1
    assert "missing 1.0.linear.bias" in capsys.readouterr().err

    wide = {k: np.zeros(v.shape[:-1] + (32,), np.float32) if k.endswith("weight") else v[:32]
            for k, v in medusa_state(n_heads=1).items()}
    wide["0.0.linear.weight"] = np.zeros((32, 32), np.float32)
    ckpt = write_safetensors(tmp_path / "w.safetensors", wide)
    with pytest.raises(ValueError, match="hidden size 32 differs from the target's 64"):
        convert_medusa.convert(ckpt, target_path, tmp_path / "h.gguf")

    junk = tmp_path / "j.safetensors"
    junk.write_bytes(b"\x10\0\0\0\0\0\0\0not json at all!")
    with pytest.raises(ModelFileError, match="not a safetensors file"):
        convert_medusa.convert(junk, target_path, tmp_path / "h.gguf")
    full = write_safetensors(tmp_path / "t.safetensors", medusa_state(n_heads=1))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(full.read_bytes()[:-10])
    with pytest.raises(ModelFileError, match="truncated"):
        convert_medusa.convert(cut, target_path, tmp_path / "h.gguf")
    other = write_safetensors(tmp_path / "o.safetensors", {"lm_head.weight": np.zeros((4, H), np.float32)})
    with pytest.raises(ValueError, match="unexpected key 'lm_head.weight'"):
        convert_medusa.convert(other, target_path, tmp_path / "h.gguf")


def test_pt_checkpoint(tmp_path, target_path):
    torch = pytest.importorskip("torch", reason="torch is not installed: .pt checkpoints "
                                "cannot be written or read (safetensors ones are tested above)")
    state = medusa_state(n_heads=2)
    ckpt = tmp_path / "medusa_lm_head.pt"
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, ckpt)
    heads = convert_medusa.convert(ckpt, target_path, tmp_path / "h.gguf", dtype="f32")
    np.testing.assert_array_equal(heads.res_weight[1, 0], state["1.0.linear.weight"])


def test_reads_files_of_the_safetensors_library(tmp_path, target_path):
    st = pytest.importorskip("safetensors.numpy", reason="safetensors is not installed "
                             "(optional: the converter reads the format with numpy alone)")
    state = medusa_state(n_heads=2, n_layers=2)
    ckpt = tmp_path / "medusa_lm_head.safetensors"
    st.save_file({k: v.astype(np.float16) for k, v in state.items()}, str(ckpt))
    heads = convert_medusa.convert(ckpt, target_path, tmp_path / "h.gguf", dtype="f32")
    np.testing.assert_array_equal(heads.res_weight[1, 1],
                                  state["1.1.linear.weight"].astype(np.float16).astype(np.float32))
    ours = write_safetensors(tmp_path / "ours.safetensors", state)
    loaded = st.load_file(str(ours))
    np.testing.assert_array_equal(loaded["0.2.weight"], state["0.2.weight"])
