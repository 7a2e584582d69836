#!/usr/bin/env python3
"""Convert a FasterDecoding Medusa checkpoint to a ggspec head GGUF.

The checkpoint (`medusa_lm_head.safetensors` or `medusa_lm_head.pt`) holds, for head i,
residual block j and n_layers blocks per head (keys may carry a `medusa_head.` prefix):

    <i>.<j>.linear.weight  (H, H)    <i>.<j>.linear.bias  (H,)    <i>.<n_layers>.weight  (V, H)

i.e. Medusa's `nn.Sequential(ResBlock * n_layers, nn.Linear(H, V, bias=False))` with
ResBlock(x) = x + SiLU(linear(x)): exactly ggspec's head (ggspec/heads/medusa.py).

    python tools/convert_medusa.py medusa_lm_head.safetensors target.gguf heads.gguf

safetensors files are read with numpy alone (F32, F16 and BF16); `.pt` files need torch.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ggspec.errors import ModelFileError  # noqa: E402
from ggspec.heads import WEIGHT_TYPES, MedusaHeads, read_target, save_heads  # noqa: E402
from ggspec.heads.convert import read_safetensors  # noqa: E402

_PREFIX = "medusa_head."
_RES = re.compile(r"^(\d+)\.(\d+)\.linear\.(weight|bias)$")
_OUT = re.compile(r"^(\d+)\.(\d+)\.weight$")
def read_pt(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise SystemExit(f"reading {path.name} needs torch (pip install torch), or convert the "
                         "checkpoint to safetensors first") from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.float().numpy() for k, v in state.items()}


def read_checkpoint(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"checkpoint not found: {path}")
    if path.suffix in (".pt", ".pth", ".bin"):
        return read_pt(path)
    return read_safetensors(path)


def heads_arrays(state: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(res_weight (nh, L, H, H), res_bias (nh, L, H), out (nh, V, H)) from Medusa keys."""
    state = {k.removeprefix(_PREFIX): v for k, v in state.items()}
    res, outs = {}, {}
    for k, v in state.items():
        if m := _RES.match(k):
            res[int(m[1]), int(m[2]), m[3]] = v
        elif m := _OUT.match(k):
            outs[int(m[1])] = (int(m[2]), v)
        else:
            raise ValueError(f"unexpected key {k!r} in a Medusa checkpoint")
    if not outs:
        raise ValueError("no output layers (<i>.<n_layers>.weight) in the checkpoint")
    n_heads = max(outs) + 1
    n_layers = {j for j, _ in outs.values()}
    if len(n_layers) != 1 or set(outs) != set(range(n_heads)):
        raise ValueError(f"heads disagree on their layer count or are missing: {sorted(outs)}")
    (n_layers,) = n_layers
    if n_layers < 1:
        raise ValueError("heads without residual blocks are not supported")
    vocab, hidden = outs[0][1].shape
    w = np.zeros((n_heads, n_layers, hidden, hidden), np.float32)
    b = np.zeros((n_heads, n_layers, hidden), np.float32)
    out = np.zeros((n_heads, vocab, hidden), np.float32)
    for h in range(n_heads):
        for l in range(n_layers):
            for part, dest, shape in (("weight", w, (hidden, hidden)), ("bias", b, (hidden,))):
                a = res.get((h, l, part))
                if a is None:
                    raise ValueError(f"missing {h}.{l}.linear.{part}")
                if a.shape != shape:
                    raise ValueError(f"{h}.{l}.linear.{part} has shape {a.shape}, expected {shape}")
                dest[h, l] = a
        if outs[h][1].shape != (vocab, hidden):
            raise ValueError(f"{h}.{n_layers}.weight has shape {outs[h][1].shape}, "
                             f"expected {(vocab, hidden)}")
        out[h] = outs[h][1]
    return w, b, out


def convert(checkpoint: str | Path, target: str | Path, out_path: str | Path, *,
            dtype: str = "f16", tied: bool = False) -> MedusaHeads:
    """Write the head GGUF for `target` from a Medusa checkpoint and return the heads.
    tied: drop the checkpoint's output layers and use the target's output rows."""
    info = read_target(target)
    w, b, out = heads_arrays(read_checkpoint(checkpoint))
    hidden, n_vocab = w.shape[-1], info.n_vocab
    if hidden != info.fingerprint.embedding_length:
        raise ValueError(f"the checkpoint's hidden size {hidden} differs from the target's "
                         f"{info.fingerprint.embedding_length}")
    token_ids = None
    if tied:
        out = info.output_rows()
    elif out.shape[1] > n_vocab:  # rows padded past the tokenizer: never predicted
        out = out[:, :n_vocab]
    elif out.shape[1] < n_vocab:
        token_ids = np.arange(out.shape[1], dtype=np.int32)
    heads = MedusaHeads(w, b, out, token_ids=token_ids, tied=tied, target=info.fingerprint)
    save_heads(out_path, heads, dtype=dtype, name=f"medusa-{Path(checkpoint).stem}")
    return heads


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="medusa_lm_head.safetensors or .pt")
    p.add_argument("target", help="the target model GGUF the heads were trained for")
    p.add_argument("output", help="head GGUF to write")
    p.add_argument("-t", "--dtype", choices=sorted(WEIGHT_TYPES), default="f16",
                   help="storage type of the matrices")
    p.add_argument("--tied", action="store_true",
                   help="use the target's output weights instead of the checkpoint's")
    args = p.parse_args(argv)
    try:
        heads = convert(args.checkpoint, args.target, args.output, dtype=args.dtype, tied=args.tied)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}: {heads.n_heads} heads x {heads.n_layers} residual layers, "
          f"hidden {heads.hidden}, vocabulary {heads.vocab_size}{' (tied)' if heads.tied else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
