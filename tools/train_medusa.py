#!/usr/bin/env python3
"""Train Medusa heads for a GGUF target on CPU and write them as a head GGUF.

    python tools/train_medusa.py qwen2.5-coder-1.5b /usr/lib/python3.11 heads.gguf \\
        --pattern '*.py' --max-tokens 20000
    python tools/code_prompts.py prompts.txt
    python tools/train_medusa.py qwen2.5-coder-1.5b prompts.txt heads.gguf --answers

Hidden states are cached in --work-dir and training checkpoints there too: run the same
command again to resume. See ggspec/heads/fit.py for what is learnt.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# numpy's OpenBLAS threads spin while other processes (or llama.cpp) hold the cores; on a
# busy 2-core machine one thread trains ~2x faster than two, and tiny steps 20x faster
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ggspec.errors import GgspecError  # noqa: E402
from ggspec.hub import resolve  # noqa: E402
from ggspec.heads.collect import CollectConfig  # noqa: E402
from ggspec.heads.fit import LABELS, TrainConfig, train_medusa  # noqa: E402
from ggspec.heads.report import format_report  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    d, t = CollectConfig(), TrainConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("target", help="target model: GGUF path or registry name")
    p.add_argument("corpus", help="text file, or directory searched recursively")
    p.add_argument("output", help="head GGUF to write")
    p.add_argument("-w", "--work-dir", help="hidden-state cache and checkpoint "
                   "(default: OUTPUT.work)")
    g = p.add_argument_group("collection")
    g.add_argument("-n", "--max-tokens", type=int, default=d.max_tokens, help="corpus tokens to use")
    g.add_argument("--window", type=int, default=d.window, help="tokens per llama.cpp pass")
    g.add_argument("--file-tokens", type=int, default=d.file_tokens, help="most tokens per file")
    g.add_argument("--pattern", default=d.pattern, help="file glob inside a corpus directory")
    g.add_argument("--answers", action="store_true",
                   help="the corpus holds prompts, one per line: learn from the target's own "
                   "greedy answers to them (self-distillation; see tools/code_prompts.py)")
    g.add_argument("--answer-tokens", type=int, default=d.answer_tokens,
                   help="with --answers: most tokens per answer")
    g.add_argument("--parallel", type=int, default=d.parallel,
                   help="with --answers: answers decoded together")
    g.add_argument("-t", "--threads", type=int, default=None, help="llama.cpp threads")
    g.add_argument("-ngl", "--n-gpu-layers", type=int, default=d.n_gpu_layers,
                   help="layers to offload (-1: all)")
    g = p.add_argument_group("heads")
    g.add_argument("--heads", type=int, default=t.n_heads, help="number of heads")
    g.add_argument("--layers", type=int, default=t.n_layers, help="residual layers per head")
    g.add_argument("--vocab-size", type=int, default=t.vocab_size,
                   help="output rows: most frequent label tokens (0: whole vocabulary)")
    g.add_argument("--untied", action="store_true",
                   help="train an output matrix per head instead of using the target's, frozen")
    g.add_argument("--labels", choices=LABELS, default=t.labels,
                   help="target's own predictions (distill) or the corpus tokens")
    g.add_argument("--dtype", choices=("f32", "f16", "q8_0"), default=t.dtype,
                   help="storage type of the matrices")
    g = p.add_argument_group("training")
    g.add_argument("-e", "--epochs", type=int, default=t.epochs, help="passes over the data")
    g.add_argument("-b", "--batch-size", type=int, default=t.batch_size, help="rows per step")
    g.add_argument("--lr", type=float, default=t.lr, help="Adam learning rate")
    g.add_argument("--weight-decay", type=float, default=t.weight_decay, help="AdamW decay")
    g.add_argument("--heldout", type=float, default=t.heldout, help="share of files held out")
    g.add_argument("-s", "--seed", type=int, default=t.seed, help="file order and batches")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    a = p.parse_args(argv)

    try:
        target = resolve(a.target, progress=not a.quiet)
        collect_cfg = CollectConfig(max_tokens=a.max_tokens, window=a.window,
                                    file_tokens=a.file_tokens, pattern=a.pattern, seed=a.seed,
                                    n_threads=a.threads, n_gpu_layers=a.n_gpu_layers,
                                    answers=a.answers, answer_tokens=a.answer_tokens,
                                    parallel=a.parallel)
        train_cfg = TrainConfig(n_heads=a.heads, n_layers=a.layers, vocab_size=a.vocab_size,
                                tied=not a.untied, labels=a.labels, epochs=a.epochs,
                                batch_size=a.batch_size, lr=a.lr, weight_decay=a.weight_decay,
                                heldout=a.heldout, seed=a.seed, dtype=a.dtype)
        work = a.work_dir or a.output + ".work"
        report = train_medusa(target, a.corpus, a.output, work, collect_cfg, train_cfg,
                              progress=not a.quiet, log=lambda s: print(s, file=sys.stderr))
    except (GgspecError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
