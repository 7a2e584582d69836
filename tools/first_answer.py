"""Decode speed of the first `auto` answer on a machine where nothing is measured yet,
against the same answer with a stored calibration and against plain decoding, each a
fresh `ggspec run` process, in turn.

    python tools/first_answer.py -f tools/prompts/rename.txt -p "Write a haiku about rust." -r 2
    python tools/first_answer.py -f tools/prompts/rename.txt --other /path/to/other/checkout

Each run gets its own empty state directory ($GGSPEC_STATE), holding only the AMX check's
verdict (kernels.json, so that no run pays for that check) and, for `stored`, the
calibration stored in this machine's state directory now (run `ggspec bench` or `ggspec
run` once first; the calibration alone: nothing learnt about copying comes with it).
`--other DIR` adds runs of the code checked out in DIR from an empty state. Prints one
line per run: tokens per second of decoding (generated tokens / decode_seconds), the
process's wall time, and whether the answer equals plain decoding's (run first in each
repetition) (a near-tie can make batched verification commit another text).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ggspec import calibration, hub, machine, weights
from ggspec.backend import default_threads


def run(code: Path, state: Path, prompt: Path, method: str, max_tokens: int) -> tuple[dict, float]:
    """One `ggspec run --json` of `code` with this state directory: its JSON and wall seconds."""
    env = {**os.environ, "GGSPEC_STATE": str(state), "PYTHONPATH": str(code)}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "ggspec", "run", "--json", "-t", "0", "-n", str(max_tokens),
                           "--method", method, "-f", str(prompt)], cwd=code, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"Error: ggspec run in {code} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(done.stdout), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-f", "--prompt-file", action="append", default=[], help="a prompt (repeatable)")
    ap.add_argument("-p", "--prompt", action="append", default=[], help="a prompt's text (repeatable)")
    ap.add_argument("-n", "--max-tokens", type=int, default=192)
    ap.add_argument("-r", "--repetitions", type=int, default=2)
    ap.add_argument("--other", type=Path, help="a checkout of other code, run from an empty state too")
    ap.add_argument("--allow-busy", action="store_true", help="measure even while the machine is busy")
    args = ap.parse_args()
    missing = [f for f in args.prompt_file if not Path(f).is_file()]
    if missing:
        raise SystemExit(f"Error: no such prompt file: {', '.join(missing)}")
    if not args.prompt_file and not args.prompt:
        raise SystemExit("Error: no prompt: give -f FILE or -p TEXT")
    if args.other and not (args.other / "ggspec" / "__init__.py").is_file():
        raise SystemExit(f"Error: {args.other} is not a checkout of ggspec (no ggspec/__init__.py there)")
    stored = hub.state_dir() / calibration.FILE
    if not stored.exists():
        raise SystemExit(f"Error: no calibration is stored in {stored.parent}: run `ggspec run` once first")
    print(machine.idle_or_exit(default_threads(), allow_busy=args.allow_busy).describe(default_threads()))
    here = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        prompts = [Path(f) for f in args.prompt_file]
        for i, text in enumerate(args.prompt):
            prompts.append(Path(tmp) / f"prompt{i}.txt")
            prompts[-1].write_text(text)
        modes = [("plain", here, "none"), ("empty", here, "auto"), ("stored", here, "auto")]
        if args.other:
            modes.append(("other, empty", args.other.resolve(), "auto"))
        for rep in range(args.repetitions):
            for prompt in prompts:
                answers = {}
                for name, code, method in modes:
                    state = Path(tempfile.mkdtemp(dir=tmp))
                    verdict = hub.state_dir() / weights.FILE
                    if verdict.exists():
                        shutil.copy(verdict, state)
                    if name == "stored":
                        shutil.copy(stored, state)
                    result, wall = run(code, state, prompt, method, args.max_tokens)
                    stats = result["stats"]
                    answers[name] = result["tokens"]
                    same = "" if name == "plain" else \
                        "  (plain's answer)" if result["tokens"] == answers["plain"] else "  (another answer)"
                    label = prompt.name if str(prompt) in args.prompt_file else prompt.read_text()[:26]
                    print(f"{rep + 1}  {label:<28} {name:<13} {stats['generated_tokens']:4d} tokens  "
                          f"{stats['generated_tokens'] / stats['decode_seconds']:6.2f} tok/s  wall {wall:6.2f} s{same}",
                          flush=True)
    print(machine.state().describe(default_threads()))


if __name__ == "__main__":
    main()
