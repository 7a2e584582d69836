"""Published head checkpoints (safetensors or pytorch .bin + config.json) to ggspec /
llama.cpp GGUF files. `convert_eagle` tells the EAGLE generations apart by the tensors.

EAGLE-3 checkpoints come in two layouts, both converted to llama.cpp's eagle3 GGUF exactly
as its converter (conversion/llama.py) does:

- SafeAILab EAGLE / SpecForge: `midlayer.*` (one llama decoder layer with an extra
  `hidden_norm`), `fc.weight`, `norm.weight`, `lm_head.weight`, `d2t` (int64 OFFSETS:
  target id = d2t[i] + i), `t2d` (unused), optional `embed_tokens.weight`;
- speculators (Red Hat): the layer as `layers.0.*`, the layer config possibly nested in
  `transformer_layer_config`, optional `input_norm.weight` (norm_before_fc).

q/k rows are permuted from HF's rotate_half layout to llama.cpp's adjacent-pair RoPE.
The target layers are config `eagle_aux_hidden_state_layer_ids`, else [2, n/2, n-3] of
the target's n layers (EAGLE-3's default).

EAGLE-1/2 checkpoints (SafeAILab EAGLE, model/cnets1.py; `fc.weight` (h, 2h), optional
`fc.bias`, `layers.0.*` without input_layernorm, q/k/v biases with config qkv_bias,
optional `embed_tokens.weight`; pytorch_model.bin read with torch) become ggspec's eagle1
GGUF (heads.eagle1), q/k rows and biases permuted the same way.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from ..errors import ModelFileError
from .eagle import EagleConfig, EagleWeights, load_eagle, save_eagle
from .eagle1 import Eagle1Config, Eagle1Weights, load_eagle1, save_eagle1
from .target import read_target

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
              "BOOL": np.bool_}
_INTS = ("I64", "I32", "I16", "I8", "U8", "BOOL")


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file: floats as float32, integers as they are. (The
    safetensors package's numpy loader cannot read BF16, the usual dtype of checkpoints.)"""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"checkpoint not found: {path}")
    data = path.read_bytes()
    if len(data) < 8:
        raise ModelFileError(f"{path} is too short to be a safetensors file")
    (n,) = struct.unpack_from("<Q", data, 0)
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelFileError(f"{path} is not a safetensors file (bad header)") from None
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ModelFileError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = (8 + n + o for o in info["data_offsets"])
        if end > len(data):
            raise ModelFileError(f"{path} is truncated (tensor {name})")
        a = np.frombuffer(data[start:end], dtype=dtype).reshape(info["shape"])
        if info["dtype"] == "BF16":  # the high half of a float32
            a = (a.astype(np.uint32) << 16).view(np.float32)
        out[name] = a.copy() if info["dtype"] in _INTS else a.astype(np.float32)
    return out


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF q/k rows (rotate_half halves per head) -> llama.cpp's adjacent pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# HF name in the decoder layer -> EagleWeights field
_LAYER = {"input_layernorm.weight": "attn_norm", "hidden_norm.weight": "attn_norm_2",
          "self_attn.q_proj.weight": "wq", "self_attn.k_proj.weight": "wk",
          "self_attn.v_proj.weight": "wv", "self_attn.o_proj.weight": "wo",
          "post_attention_layernorm.weight": "ffn_norm", "mlp.gate_proj.weight": "ffn_gate",
          "mlp.up_proj.weight": "ffn_up", "mlp.down_proj.weight": "ffn_down"}
_TOP = {"fc.weight": "fc", "norm.weight": "output_norm", "lm_head.weight": "output",
        "embed_tokens.weight": "token_embd", "input_norm.weight": "enc_norm", "d2t": "d2t"}
_IGNORED = ("t2d",)


def read_torch_bin(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a PyTorch state dict file (pytorch_model.bin), as read_safetensors
    gives them; needs torch (the optional `train` extra)."""
    try:
        import torch
    except ImportError:
        raise ModelFileError(f"reading {path} needs torch: pip install 'ggspec[train]' (or save the "
                             "checkpoint as safetensors)") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds (pickle, zip, runtime) on a bad file
        raise ModelFileError(f"{path} is not a PyTorch state dict ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise ModelFileError(f"{path} holds a {type(state).__name__}, not a state dict")
    return {name: t.float().numpy() if t.is_floating_point() else t.numpy()
            for name, t in state.items() if isinstance(t, torch.Tensor)}


def read_eagle_checkpoint(src: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """config.json and the tensors of an EAGLE checkpoint directory (every *.safetensors
    in it, else every *.bin), the layer renamed to the SpecForge layout (`midlayer.*`)."""
    src = Path(src)
    if not (src / "config.json").is_file():
        raise ModelFileError(f"{src} is not an EAGLE checkpoint directory (no config.json)")
    try:
        config = json.loads((src / "config.json").read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{src / 'config.json'} is not JSON ({e})") from None
    config = {**config, **config.get("transformer_layer_config", {})}  # speculators nests it
    files = sorted(src.glob("*.safetensors"))
    read = read_safetensors
    if not files:
        files, read = sorted(src.glob("*.bin")), read_torch_bin
    if not files:
        raise ModelFileError(f"no .safetensors (or pytorch .bin) files in {src}")
    tensors = {}
    for f in files:
        for name, a in read(f).items():
            name = name.removeprefix("model.")
            if name.startswith("layers.0."):
                name = "midlayer." + name[len("layers.0."):]
            tensors[name] = a
    return config, tensors


def is_eagle1_checkpoint(config: dict, tensors: dict[str, np.ndarray]) -> bool:
    """EAGLE-1/2 (SafeAILab cnets1.py): fc over [embedding ; hidden] (2h wide), no
    hidden_norm; EAGLE-3's fc reads 3 target hidden states and its layer has hidden_norm."""
    fc = tensors.get("fc.weight")
    return ("midlayer.hidden_norm.weight" not in tensors and fc is not None and fc.ndim == 2
            and fc.shape[1] == 2 * config.get("hidden_size", -1))


def _needs(src, config: dict):
    def need(key):
        if key not in config:
            raise ModelFileError(f"{src}/config.json has no {key}")
        return config[key]

    if need("num_hidden_layers") != 1:
        raise ModelFileError(f"{src}: an EAGLE draft has one decoder layer, config says "
                             f"{config['num_hidden_layers']}")
    return need


def _verified(path: Path, load, info) -> Path:
    """`path` if it loads for the target (shapes, ids, fingerprint); else removed."""
    try:
        load(path, info)
    except ModelFileError:
        path.unlink()
        raise
    return path


def convert_eagle(src: str | os.PathLike, target: str | os.PathLike, out: str | os.PathLike, *,
                  dtype: str = "f16") -> Path:
    """Write the EAGLE checkpoint directory `src` as a GGUF for `target` (a GGUF path):
    EAGLE-3 (SpecForge or speculators layout) as llama.cpp's eagle3 (with the target's
    tokenizer), EAGLE-1/2 (SafeAILab cnets1.py) as ggspec's eagle1 (heads.eagle1)."""
    config, t = read_eagle_checkpoint(src)
    info = read_target(target)
    if is_eagle1_checkpoint(config, t):
        return _convert_eagle1(src, config, t, info, out, dtype)
    need = _needs(src, config)
    n = info.n_layer
    layers = config.get("eagle_aux_hidden_state_layer_ids") or [2, n // 2, n - 3]
    n_head = need("num_attention_heads")
    n_head_kv = config.get("num_key_value_heads") or n_head
    cfg = EagleConfig(hidden=need("hidden_size"), n_head=n_head, n_head_kv=n_head_kv,
                      n_ff=need("intermediate_size"), target_layers=tuple(layers),
                      target_hidden=config.get("target_hidden_size") or info.fingerprint.embedding_length,
                      rms_eps=float(config.get("rms_norm_eps", 1e-6)),
                      rope_base=float(config.get("rope_theta", 10000.0)),
                      context_length=int(config.get("max_position_embeddings", 4096)),
                      norm_before_residual=bool(config.get("norm_before_residual", False)),
                      norm_before_fc=bool(config.get("norm_before_fc", False)))
    fields: dict[str, np.ndarray | None] = {}
    for name, a in t.items():
        if name.startswith("midlayer.") and name[len("midlayer."):] in _LAYER:
            fields[_LAYER[name[len("midlayer."):]]] = a
        elif name in _TOP:
            fields[_TOP[name]] = a
        elif name not in _IGNORED:
            raise ModelFileError(f"{src}: unexpected tensor {name!r} in an EAGLE-3 checkpoint")
    missing = [k for k in (*_LAYER.values(), "fc", "output_norm") if k not in fields]
    if missing:
        raise ModelFileError(f"{src}: the checkpoint lacks {missing[0]} "
                             f"({len(missing)} tensors missing)")
    fields["wq"] = _permute(fields["wq"], n_head)
    fields["wk"] = _permute(fields["wk"], n_head_kv)
    if fields.get("d2t") is not None:  # offsets -> target ids
        d2t = fields["d2t"].reshape(-1).astype(np.int64)
        fields["d2t"] = d2t + np.arange(d2t.size)
    try:
        path = save_eagle(out, cfg, EagleWeights(**fields), target, dtype=dtype,
                          name=Path(src).name)
    except (ValueError, TypeError) as e:
        raise ModelFileError(f"{src}: cannot convert ({e})") from None
    return _verified(path, load_eagle, info)


# HF name (SafeAILab EAGLE-1/2, after the `midlayer.` renaming) -> Eagle1Weights field
_EAGLE1 = {"fc.weight": "fc", "fc.bias": "fc_bias", "embed_tokens.weight": "token_embd",
           "midlayer.self_attn.q_proj.weight": "wq", "midlayer.self_attn.q_proj.bias": "bq",
           "midlayer.self_attn.k_proj.weight": "wk", "midlayer.self_attn.k_proj.bias": "bk",
           "midlayer.self_attn.v_proj.weight": "wv", "midlayer.self_attn.v_proj.bias": "bv",
           "midlayer.self_attn.o_proj.weight": "wo", "midlayer.post_attention_layernorm.weight": "ffn_norm",
           "midlayer.mlp.gate_proj.weight": "ffn_gate", "midlayer.mlp.up_proj.weight": "ffn_up",
           "midlayer.mlp.down_proj.weight": "ffn_down"}
_EAGLE1_OPTIONAL = ("fc_bias", "bq", "bk", "bv", "token_embd")


def _convert_eagle1(src, config: dict, t: dict[str, np.ndarray], info, out, dtype: str) -> Path:
    """An EAGLE-1/2 checkpoint (fc over [embedding ; hidden], one layer without its input
    norm, the target's lm_head) as an eagle1 GGUF."""
    need = _needs(src, config)
    n_head = need("num_attention_heads")
    n_head_kv = config.get("num_key_value_heads") or n_head
    fields = {}
    for name, a in t.items():
        if name in _EAGLE1:
            fields[_EAGLE1[name]] = a
        elif not name.endswith("rotary_emb.inv_freq"):  # a buffer older checkpoints saved
            raise ModelFileError(f"{src}: unexpected tensor {name!r} in an EAGLE-1/2 checkpoint")
    missing = [k for k in _EAGLE1.values() if k not in fields and k not in _EAGLE1_OPTIONAL]
    if missing:
        raise ModelFileError(f"{src}: the checkpoint lacks {missing[0]} ({len(missing)} tensors missing)")
    for w, b, heads in (("wq", "bq", n_head), ("wk", "bk", n_head_kv)):
        fields[w] = _permute(fields[w], heads)
        if fields.get(b) is not None:
            fields[b] = _permute(fields[b], heads)
    try:
        cfg = Eagle1Config(hidden=need("hidden_size"), n_head=n_head, n_head_kv=n_head_kv,
                           n_ff=need("intermediate_size"), rms_eps=float(config.get("rms_norm_eps", 1e-6)),
                           rope_base=float(config.get("rope_theta", 10000.0)),
                           context_length=int(config.get("max_position_embeddings", 4096)))
        path = save_eagle1(out, cfg, Eagle1Weights(**fields), info, dtype=dtype, name=Path(src).name)
    except (ValueError, TypeError) as e:
        raise ModelFileError(f"{src}: cannot convert ({e})") from None
    return _verified(path, load_eagle1, info)
