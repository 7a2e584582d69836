"""Print the target's verification cost curve t(b) / t(1) on this machine: the time of one
llama_decode of b tokens after `depth` cached tokens (best of `repeat`).

    python tools/cost_curve.py --depth 700

Speculation can only pay where t(b) grows slower than b: with every draft token accepted,
a round of b rows commits b tokens, so b / (t(b) / t(1)) bounds any exact method's speedup.
"""

from __future__ import annotations

import argparse
import time

from ggspec import BackendConfig, hub, machine
from ggspec.backend import Context, Model, default_threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default=None, help="registry name or GGUF path")
    ap.add_argument("--depth", type=int, default=700, help="tokens already in the KV cache")
    ap.add_argument("--sizes", type=int, nargs="+", default=list(range(1, 18)) + [20, 24, 28, 33])
    ap.add_argument("--repeat", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--allow-busy", action="store_true", help="measure even while the machine is busy")
    args = ap.parse_args()
    cfg = BackendConfig(n_ctx=args.depth + max(args.sizes) + 16, n_threads=args.threads)
    state = machine.idle_or_exit(args.threads or default_threads(), allow_busy=args.allow_busy)
    print(state.describe(args.threads or default_threads()))
    with Model(hub.resolve(args.model or hub.default_model()), cfg) as model, Context(model, cfg) as ctx:
        ctx.eval([100] * args.depth, logits="none")
        best = {}
        for b in args.sizes:
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                ctx.eval([100] * b, logits="all")
                times.append(time.perf_counter() - t0)
                ctx.truncate(args.depth)
            best[b] = min(times)
    t1 = best[min(best)]
    print(f"t(1) = {1000 * t1:.1f} ms at depth {args.depth}")
    print("b      " + " ".join(f"{b:>6}" for b in best))
    print("t(b)/t1" + " ".join(f"{t / t1:>6.2f}" for t in best.values()))
    print("b/t    " + " ".join(f"{b * t1 / t:>6.2f}" for b, t in best.items()))


if __name__ == "__main__":
    main()
