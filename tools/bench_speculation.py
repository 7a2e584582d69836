"""Benchmark ggspec's methods against plain decoding and against llama-cpp-python's own
prompt-lookup speculation, on the built-in workloads, in ONE process.

    python tools/bench_speculation.py --max-tokens 256 --json out.json

Every ggspec variant runs on one Engine (`ggspec.bench.run_grid`, interleaved per
repetition). llama-cpp-python's `Llama(draft_model=LlamaPromptLookupDecoding(...))` runs
right after each workload, together with a plain `Llama` run, so its speed is compared to
plain decoding taken under the same conditions. All greedy.
"""

from __future__ import annotations

import argparse
import json
import time

from llama_cpp import Llama
from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

from ggspec import Engine, SamplingConfig, hub
from ggspec.backend import default_threads
from ggspec.bench import WORKLOADS, Variant, run_grid, table


def llama_cpp_python_tps(llm: Llama, prompt: list[int], max_tokens: int) -> float:
    """Decode tokens per second of llama-cpp-python's generate loop (greedy). The prompt is
    evaluated once untimed, so the timed call reuses its KV cache like ggspec does."""
    llm.reset()
    llm.eval(prompt)
    t0 = time.perf_counter()
    n = 0
    for token in llm.generate(prompt, temp=0.0, top_k=1):  # the cached prompt is reused
        n += 1
        if n >= max_tokens or llm.token_eos() == token:
            break
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS))
    ap.add_argument("--lookup-k", nargs="+", type=int, default=[3, 5, 8])
    ap.add_argument("--draft-k", nargs="+", type=int, default=[1, 2, 3, 4])
    ap.add_argument("--pld-tokens", type=int, default=10, help="LlamaPromptLookupDecoding num_pred_tokens")
    ap.add_argument("--json", help="write all figures to this file")
    args = ap.parse_args()

    grid = ([Variant("none")] + [Variant("lookup", k) for k in args.lookup_k]
            + [Variant("draft", k) for k in args.draft_k] + [Variant("auto", 8)])
    workloads = [WORKLOADS[w] for w in args.workloads]
    target = str(hub.pull(hub.default_model()))
    results = {"ggspec": [], "llama_cpp_python": []}
    with Engine() as engine:
        for workload in workloads:
            rows = run_grid(engine, [workload], grid, max_tokens=args.max_tokens,
                            sampling=SamplingConfig(temperature=0))
            print(table(rows), flush=True)
            for row in rows:
                d = row.to_dict()
                d["controller"] = row.stats.controller
                results["ggspec"].append(d)
            prompt = engine.tokenize([{"role": "user", "content": workload.prompt}])
            threads = default_threads()  # as ggspec uses (Llama's default is half the CPUs)
            plain = Llama(target, n_ctx=4096, n_threads=threads, n_threads_batch=threads, verbose=False)
            # logits_all=True: 0.3.36 sizes its score buffer by this argument, not by draft_model
            pld = Llama(target, n_ctx=4096, n_threads=threads, n_threads_batch=threads, verbose=False, logits_all=True,
                        draft_model=LlamaPromptLookupDecoding(num_pred_tokens=args.pld_tokens))
            tps_plain = llama_cpp_python_tps(plain, prompt, args.max_tokens)
            tps_pld = llama_cpp_python_tps(pld, prompt, args.max_tokens)
            lookup_best = max(r.stats.decode_tokens_per_second for r in rows if r.variant.method == "lookup")
            line = {"workload": workload.name, "plain_tps": tps_plain, "pld_tps": tps_pld,
                    "pld_speedup": tps_pld / tps_plain, "ggspec_lookup_best_over_pld": lookup_best / tps_pld}
            results["llama_cpp_python"].append(line)
            print(f"llama-cpp-python {workload.name}: plain {tps_plain:.1f} tok/s, "
                  f"prompt lookup {tps_pld:.1f} tok/s ({tps_pld / tps_plain:.2f}x); "
                  f"ggspec best lookup / llama-cpp-python lookup = {lookup_best / tps_pld:.2f}\n", flush=True)
            del plain, pld
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
