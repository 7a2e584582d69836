"""Replay `auto`'s copy drafting offline on recorded greedy answers, at the stored cost curve:
a noise-free way to compare controller changes in seconds instead of benchmark minutes.

    python tools/replay_auto.py record answers.json -n 192     # the target's greedy answers (once)
    python tools/replay_auto.py record held.json $(for f in tools/prompts/*.txt; do echo --prompt-file $f; done)
    python tools/replay_auto.py record heldout.json $(for f in tools/prompts/heldout/*.txt; do echo --prompt-file $f; done)
    python tools/replay_auto.py replay answers.json -k 16      # auto's lookup plans, replayed
    python tools/replay_auto.py replay answers.json --fresh   # each as an engine's first answer
    python tools/replay_auto.py replay answers.json --orders 8  # in 8 random orders of the answers
    python tools/replay_auto.py replay answers.json --experience ~/.cache/ggspec/experience.json

At greedy the committed tokens do not depend on the drafts, so a replay commits the same
answer and only its rounds differ: each round costs t(rows) from the calibration, and the
ratio is n * t(1) / (sum of the rounds' t). `replay` prints, per workload, auto's ratio when
the workloads follow each other (as in `ggspec bench`, the estimates carried over), and the
same copy sources with each proposal's accepted length known in advance (the best length
for each round chosen myopically): the part of the gap to the copy oracle that better
prediction could close, and last the geometric mean of every answer's ratio. Drafting
time, Python work and timing noise are left out.

What `auto` learns from one answer changes how it drafts the next, so a change of the
estimates can move single answers by a few percent through the order alone. `--orders N`
replays N times, each from the starting guesses and in its own random order of the
answers (seeded): each answer's ratio is then its median over all of them, and the last
line gives the mean of the N geometric means and their spread.

`--experience FILE` starts each replay (each order, each `--fresh` answer) from the copy
estimates an engine stored in FILE (an `experience.json`, its most recently saved entry)
instead of the starting guesses: how a user's machine, with what it learnt from earlier
answers, drafts these answers (a live run's losses can depend on that stored state).

`tools/prompts/heldout/` holds prompts that no change of the estimates was tried on:
compare a change there too, after the replays it was developed on, before keeping it.

The last column replays llama.cpp's `ngram-cache` drafting (`llama-speculative-simple
--spec-type ngram-cache`, the mode that `bench --native` found best on qa and revise) on
the same answers at the same curve, so the two drafters are compared on one text: live,
llama.cpp's answer can leave ggspec's at a near-tie, and its tools may run other kernels
(another curve). The rule is common/ngram-cache.cpp's as common/speculative.cpp calls it:
up to NGRAM_CACHE_DRAFT tokens, each the most frequent continuation of the longest 4- to
1-gram before it that has been seen often and consistently enough (NGRAM_CACHE_MIN_*), from
counts of the prompt and the tokens added since each update, counted on their own (so
n-grams across two updates, most of the answer's own, are never counted). Over llama.cpp's
revise answer it drafted 153 tokens and 72 were accepted, where llama.cpp reported 158 and
73 over its 196 tokens (docs/speed-notes.md).
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter, defaultdict
from collections.abc import Callable

import numpy as np

from ggspec import Engine, SamplingConfig, SpecConfig, calibration
from ggspec.bench import WORKLOADS, Workload, _prompt_text, select_workloads
from ggspec.controller import CostModel, MatchAcceptance
from ggspec.drafters import Draft
from ggspec.drafters.auto import AutoDrafter
from ggspec.drafters.lookup import LookupDrafter

GREEDY = SamplingConfig(temperature=0)
# one round of a replay: (committed tokens, the output still to come, draft budget) ->
# (tokens drafted, tokens of them accepted)
Round = Callable[[list[int], list[int], int], tuple[int, int]]


def record(path: str, max_tokens: int, rows: int, workloads: list[Workload]) -> None:
    data = {}
    with Engine() as engine:
        for workload in workloads:
            prompt = engine.tokenize(_prompt_text(engine, workload, True, max_tokens))
            answer = engine.generate(prompt, max_tokens=max_tokens, sampling=GREEDY, spec=SpecConfig("none"))
            data[workload.name] = {"prompt": prompt, "output": answer.tokens}
        data["_curve"] = calibration.verify_curve(engine.ctx, rows).tolist()
        data["_line_ends"] = np.flatnonzero(engine.target.line_ends()).tolist()
        data["_n_vocab"] = engine.target.n_vocab
    with open(path, "w") as f:
        json.dump(data, f)


def accepted(proposal: list[int], truth: list[int]) -> int:
    n = 0
    while n < len(proposal) and n < len(truth) and proposal[n] == truth[n]:
        n += 1
    return n


def accepted_nodes(draft: Draft, truth: list[int]) -> list[int]:
    """The draft's nodes the target accepts when it commits `truth` (greedy)."""
    if draft.tree is None:
        return list(range(accepted(draft.tokens, truth)))
    nodes: list[int] = []
    while len(nodes) < len(truth):
        row = nodes[-1] + 1 if nodes else 0
        child = next((c for c in draft.tree.children[row] if draft.tokens[c] == truth[len(nodes)]), None)
        if child is None:
            break
        nodes.append(child)
    return nodes


def replay(data: dict, k: int, repetitions: int, paths: int = 1, fresh: bool = False, orders: int = 0,
           seed: int = 0, start: dict | None = None) -> tuple[dict[str, tuple[float, float]], list[float]]:
    """({workload: (auto's median ratio, known acceptance's)}, the geometric mean of every
    answer's ratio in each run: one run in the recorded order, or `orders` in random ones).
    start: copy estimates to start from (MatchAcceptance.state()), else the starting guesses."""
    curve = np.asarray(data["_curve"])
    if len(curve) < k + 1:
        raise SystemExit(f"Error: the recorded curve covers {len(curve)} rows; record with --rows {k + 1}")
    names = [n for n in data if not n.startswith("_")]
    line_ends = np.zeros(data["_n_vocab"], dtype=bool)
    line_ends[data["_line_ends"]] = True
    ratios: dict[str, list[float]] = {n: [] for n in names}
    means = []
    shuffle = random.Random(seed)

    def new_auto() -> AutoDrafter:
        auto = AutoDrafter(CostModel(curve), LookupDrafter(), None, line_ends, max_paths=paths)
        if start is not None:
            auto.copy_acceptance.set_state(start)
        return auto

    for _ in range(max(orders, 1)):
        auto = new_auto()
        logs = []
        for _ in range(repetitions):
            for name in shuffle.sample(names, len(names)) if orders else names:
                if fresh:  # from the starting guesses (or `start`), as an engine's first answer
                    auto = new_auto()
                ratio = replay_answer(auto, data[name], curve, k)
                ratios[name].append(ratio)
                logs.append(np.log(ratio))
        means.append(float(np.exp(np.mean(logs))))
    return {n: (float(np.median(r)), known(data[n], curve, k)) for n, r in ratios.items()}, means


def timed(answer: dict, curve: np.ndarray, k: int, round_: Round, first: int = 0) -> float:
    """The speed ratio over plain decoding of one recorded answer decoded in rounds at
    `curve`: the first `first` output tokens each in a plain round, then round_'s (drafting
    at most k tokens a round)."""
    prompt, out = answer["prompt"], answer["output"]
    committed, pos, seconds = [*prompt, *out[:first]], first, first * float(curve[0])
    while pos < len(out):
        drafted, n = round_(committed, out[pos:], min(k, len(out) - pos - 1))
        seconds += curve[drafted]
        committed += out[pos:pos + n + 1]
        pos += n + 1
    return float(len(out) * curve[0] / seconds)


def replay_answer(auto: AutoDrafter, answer: dict, curve: np.ndarray, k: int) -> float:
    """auto's speed ratio over plain decoding on one recorded answer (its estimates carried on)."""
    auto.prepare(answer["prompt"])

    def round_(committed: list[int], truth: list[int], budget: int) -> tuple[int, int]:
        draft = auto.propose(committed, budget, GREEDY, None)
        nodes = accepted_nodes(draft, truth)
        auto.accept(draft, nodes)
        return len(draft.tokens), len(nodes)

    return timed(answer, curve, k, round_)


def known(answer: dict, curve: np.ndarray, k: int) -> float:
    """The same copy sources, each round drafting the best length given how many of the
    source's tokens will be accepted."""
    lookup = LookupDrafter(min_match=1)
    lookup.prepare(answer["prompt"])

    def round_(committed: list[int], truth: list[int], budget: int) -> tuple[int, int]:
        lengths = np.arange(accepted(lookup.match(committed, budget).tokens, truth) + 1)
        n = int(lengths[np.argmax((lengths + 1) / curve[lengths])])
        return n, n

    return timed(answer, curve, k, round_)


NGRAM_CACHE_DRAFT = 8  # common/speculative.cpp, create_state_ngram_cache
NGRAM_CACHE_MIN_COUNT = (2, 2, 1, 1)  # of 1- to 4-grams (common/ngram-cache.cpp, the "lax" thresholds)
NGRAM_CACHE_MIN_PERCENT = (66, 50, 50, 50)


def ngram_cache(answer: dict, curve: np.ndarray) -> float:
    """llama.cpp ngram-cache's speed ratio over plain decoding on one recorded answer."""
    if not answer["output"]:
        return float("nan")  # (as replay_answer's 0 / 0: no tokens, no ratio)
    counts: dict[tuple[int, ...], Counter[int]] = defaultdict(Counter)
    counted = 0  # committed tokens counted so far

    def round_(committed: list[int], truth: list[int], budget: int) -> tuple[int, int]:
        nonlocal counted
        new = committed[counted:]
        for size in range(1, 5):
            for i in range(size, len(new)):
                counts[tuple(new[i - size:i])][new[i]] += 1
        counted = len(committed)
        draft: list[int] = []
        while len(draft) < budget:
            text = committed[-4:] + draft  # (the longest n-gram looked up is 4 tokens)
            for size in (4, 3, 2, 1):
                seen = counts.get(tuple(text[-size:]))
                if not seen:
                    continue
                token, count = seen.most_common(1)[0]
                total = seen.total()
                if total >= NGRAM_CACHE_MIN_COUNT[size - 1] and 100 * count >= NGRAM_CACHE_MIN_PERCENT[size - 1] * total:
                    draft.append(token)
                    break
            else:
                break
        return len(draft), accepted(draft, truth)

    # (the first token comes from the prompt's decode)
    return timed(answer, curve, NGRAM_CACHE_DRAFT, round_, first=1)


def stored_estimates(path: str) -> dict:
    """The copy estimates of the most recently saved entry of an experience.json."""
    try:
        with open(path) as f:
            stored = json.load(f)
        entries = [e for e in stored.values() if isinstance(e, dict) and "auto" in e]
    except (OSError, ValueError, AttributeError) as e:
        raise SystemExit(f"Error: cannot read {path} as an experience.json: {e}") from None
    if not entries:
        raise SystemExit(f"Error: {path} holds no estimates of `auto`; run `ggspec bench` or a generation "
                         "with --method auto first")
    try:
        state = max(entries, key=lambda e: e.get("saved", 0))["auto"]["copy_acceptance"]
        MatchAcceptance().set_state(state)  # (raises where they do not fit)
    except (KeyError, TypeError, ValueError) as e:
        raise SystemExit(f"Error: the latest estimates in {path} do not fit this version of ggspec ({e!r}); "
                         "run `ggspec bench` to store new ones") from None
    return state


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="record the target's greedy answers and the cost curve")
    rec.add_argument("path")
    rec.add_argument("-n", "--max-tokens", type=int, default=192)
    rec.add_argument("--rows", type=int, default=17, help="rows of the cost curve to store")
    rec.add_argument("-w", "--workload", action="append", choices=list(WORKLOADS),
                     help="built-in workloads to answer [default: all, or none with --prompt-file]")
    rec.add_argument("--prompt-file", action="append", default=[],
                     help="a file whose text is a user message, named by its stem (repeatable)")
    rep = sub.add_parser("replay", help="replay auto's copy drafting on recorded answers")
    rep.add_argument("path")
    rep.add_argument("-k", "--draft-max", type=int, default=16)
    rep.add_argument("-r", "--repetitions", type=int, default=3)
    rep.add_argument("--paths", type=int, default=1, help="candidate trees of up to this many paths")
    rep.add_argument("--curve", type=float, nargs="+", help="t(b) / t(1) for b = 1, 2, ... instead of the recorded curve")
    rep.add_argument("--fresh", action="store_true",
                     help="each workload from the starting guesses (an engine's first answer), not after the others")
    rep.add_argument("--orders", type=int, default=0,
                     help="replay this many times, each in a random order of the answers (seeded by --seed)")
    rep.add_argument("--seed", type=int, default=0, help="of the random orders")
    rep.add_argument("--experience", metavar="FILE",
                     help="start from the copy estimates stored in this experience.json (its latest entry)")
    args = ap.parse_args()
    if args.command == "record":
        try:  # every prompt file read before a model is loaded
            workloads = select_workloads(args.workload or [], args.prompt_file)
        except (OSError, ValueError) as e:
            raise SystemExit(f"Error: {e}") from None
        seen: set[str] = set()
        for w in workloads:
            if w.name.startswith("_") or w.name in seen:
                raise SystemExit(f"Error: a second answer or a reserved name would be recorded as '{w.name}': "
                                 "rename the prompt file")
            seen.add(w.name)
        record(args.path, args.max_tokens, args.rows, workloads)
        return
    if args.orders < 0:
        raise SystemExit(f"Error: --orders must be 0 or more, got {args.orders}")
    with open(args.path) as f:
        data = json.load(f)
    start = stored_estimates(args.experience) if args.experience else None
    print("workload  auto   known acceptance  llama.cpp ngram-cache")
    if args.curve:
        data["_curve"] = args.curve
    ratios, means = replay(data, args.draft_max, args.repetitions, args.paths, args.fresh, args.orders, args.seed,
                           start)
    curve = np.asarray(data["_curve"])
    for name, (ratio, bound) in ratios.items():
        print(f"{name:8}  {ratio:.2f}x  {bound:.2f}x             {ngram_cache(data[name], curve):.2f}x")
    spread = f" (orders {min(means):.4f}-{max(means):.4f})" if args.orders else ""
    print(f"all answers: geometric mean {np.mean(means):.4f}x{spread}")


if __name__ == "__main__":
    main()
