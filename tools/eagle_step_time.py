"""Print what one EAGLE draft depth step costs on each evaluator (numpy, llama.cpp's
eagle3 graph) against one target decode, after `depth` cached tokens (best of `repeat`).

    python tools/eagle_step_time.py -m target.gguf --eagle eagle3.gguf --depth 512

The budget (issue 11): one draft depth step <= 10% of a target decode. A tree of depth D
costs D - 1 such steps (the first depth comes from the round's committed rows) plus
fusing and committing those rows. Engine(eagle_backend="auto") picks the faster path
by the same measurement (after one committed row) at start.
"""

from __future__ import annotations

import argparse
from contextlib import ExitStack

from ggspec import BackendConfig, hub, machine
from ggspec.backend import Context, Model, default_threads, eagle_graph_missing
from ggspec.calibration import measure
from ggspec.drafters.eagle import DEPTH, TOP_K
from ggspec.heads.eagle import load_eagle
from ggspec.heads.eagle_paths import open_path, step_seconds

BUDGET = 0.10  # of a target decode, per draft depth step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default=None, help="target: registry name or GGUF path")
    ap.add_argument("--eagle", required=True, help="EAGLE-3 draft GGUF (eagle3 format) for the target")
    ap.add_argument("--depth", type=int, default=512, help="tokens already in both KV caches")
    ap.add_argument("--width", type=int, default=TOP_K, help="tree nodes per depth step")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("-ngl", "--gpu-layers", type=int, default=-1, help="target and draft layers on the GPU")
    ap.add_argument("--allow-busy", action="store_true", help="measure even while the machine is busy")
    args = ap.parse_args()
    threads = args.threads or default_threads()
    state = machine.idle_or_exit(threads, allow_busy=args.allow_busy)
    print(state.describe(threads))
    cfg = BackendConfig(n_ctx=args.depth + 64, n_batch=512, n_threads=args.threads,
                        n_gpu_layers=args.gpu_layers)
    with ExitStack() as stack:
        target = stack.enter_context(Model(hub.resolve(args.model or hub.default_model()), cfg))
        ctx = stack.enter_context(Context(target, cfg))
        heads = load_eagle(args.eagle, target)
        ctx.eval([100] * args.depth, logits="none")
        t_target = min(measure(ctx, 1)[0] for _ in range(args.repeat))
        print(f"target decode, 1 row after {args.depth}: {t_target * 1e3:8.3f} ms")
        width = min(args.width, heads.vocab_size)
        for name in ("numpy", "llama"):
            if name == "llama" and eagle_graph_missing():
                print(f"llama: unavailable: {eagle_graph_missing()}")
                continue
            path = open_path(name, heads, args.eagle, cfg, ctx, stack, width, DEPTH)
            t = step_seconds(path, width, history=args.depth, repeats=args.repeat)
            verdict = "within" if t <= BUDGET * t_target else "over"
            print(f"eagle depth step, {name:5s} ({width} nodes): {t * 1e3:8.3f} ms = "
                  f"{t / t_target:6.1%} of a target decode ({verdict} the {BUDGET:.0%} budget)")


if __name__ == "__main__":
    main()
