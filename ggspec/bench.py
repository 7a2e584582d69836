"""Benchmarks: workloads x speculation variants, measured side by side in one process.

`run_grid` returns data (one Row per workload and variant); `table` and `plot` present it.
Every variant runs on the same Engine, interleaved within each repetition (every other
repetition in reverse order), so the ratio to plain decoding (`none`) compares runs taken
under the same conditions. With llama.cpp's own tools (`native`), each repetition also
runs them on the same prompt right after ggspec's.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .config import SamplingConfig, SpecConfig
from .controller import oracle_speedup
from .drafters.lookup import copyable
from .engine import Engine
from .errors import GgspecError
from .native import LlamaCpp, NativeRun, NativeVariant
from .stats import Stats

_MODULE = '''\
import json
import os
import time


class Cache:
    """A small JSON file cache with expiry."""

    def __init__(self, path, ttl=3600):
        self.path = path
        self.ttl = ttl
        self.data = {}
        if os.path.exists(path):
            with open(path) as f:
                self.data = json.load(f)

    def get(self, key, default=None):
        entry = self.data.get(key)
        if entry is None:
            return default
        if time.time() - entry["time"] > self.ttl:
            del self.data[key]
            return default
        return entry["value"]

    def set(self, key, value):
        self.data[key] = {"value": value, "time": time.time()}

    def save(self):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f)
        os.replace(tmp, self.path)

    def prune(self):
        now = time.time()
        stale = [k for k, e in self.data.items() if now - e["time"] > self.ttl]
        for key in stale:
            del self.data[key]
        return len(stale)


def word_counts(lines):
    counts = {}
    for line in lines:
        for word in line.split():
            word = word.strip(".,;:!?").lower()
            if word:
                counts[word] = counts.get(word, 0) + 1
    return counts


def top_words(counts, n=10):
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return ranked[:n]


def load_lines(path, encoding="utf-8"):
    with open(path, encoding=encoding) as f:
        return [line.rstrip("\\n") for line in f]
'''

_ARTICLE = """\
The Lighthouse Keepers of the Northern Coast

For almost two centuries, the lighthouses along the northern coast were tended by families
who lived beside them all year round. A keeper's day began before dawn, when the lamp was
extinguished, the lens was polished, and the wick was trimmed so that it would burn evenly
the following night. Soot was the keeper's constant enemy: a thin film on the glass could
cut the range of the light by several miles, and ships relied on seeing it from far out at
sea. In the afternoon the keeper recorded the weather in a logbook, noting wind direction,
visibility and the state of the sea every few hours.

The work was lonely but rarely idle. Oil had to be carried up the tower in heavy cans, often
more than a hundred steps, and the clockwork that turned the lens had to be wound by hand
every few hours through the night. In fog, the keeper sounded a horn or rang a bell at fixed
intervals until the air cleared, sometimes for two or three days without proper sleep.
Supplies arrived by boat once a month when the weather allowed, and in winter storms the
families could be cut off for weeks.

Children of keepers learned to read the sea early. Many of them later became fishermen,
pilots or keepers themselves, and some stations were run by the same family for three
generations. Wives frequently kept the light when their husbands were ill or away, and in
several cases they were officially appointed after a husband's death, which made
lighthouse keeping one of the few government posts open to women in the nineteenth century.

Change came gradually. Electric lamps replaced oil in the early twentieth century,
reducing the daily labour but not the need for someone to watch the light. Radio beacons
and later satellite navigation made the lights less essential for large ships, although
small boats still depend on them. The last keepers on the northern coast left their posts
in the 1980s, when automatic equipment was installed that could switch the lamp on at dusk,
change a failed bulb by itself, and report faults to a control room on the mainland.

Today most of the towers are still working, but their cottages stand empty or have been
turned into museums and holiday homes. Visitors can climb the stairs, look at the great
glass lenses, and read the old logbooks, in which generations of keepers wrote down the
weather, the passing ships, and now and then a short note about a rescue or a birth.
"""

_CALLBACKS = """\
const fs = require("fs");
const path = require("path");

function loadConfig(dir, callback) {
  fs.readFile(path.join(dir, "config.json"), "utf8", function (err, text) {
    if (err) {
      callback(err);
      return;
    }
    let config;
    try {
      config = JSON.parse(text);
    } catch (parseErr) {
      callback(parseErr);
      return;
    }
    fs.readdir(path.join(dir, config.dataDir), function (err, names) {
      if (err) {
        callback(err);
        return;
      }
      const files = names.filter(function (name) { return name.endsWith(".csv"); });
      let pending = files.length;
      const sizes = {};
      if (pending === 0) {
        callback(null, { config: config, sizes: sizes });
        return;
      }
      files.forEach(function (name) {
        fs.stat(path.join(dir, config.dataDir, name), function (err, stat) {
          if (err) {
            callback(err);
            return;
          }
          sizes[name] = stat.size;
          pending -= 1;
          if (pending === 0) {
            callback(null, { config: config, sizes: sizes });
          }
        });
      });
    });
  });
}

module.exports = { loadConfig };
"""

_EDIT_PROMPT = ("Add type hints to every function and method of this Python module. Change nothing "
                "else and reply with the complete module in one code block.\n\n```python\n" + _MODULE + "```")
_SUMMARY_PROMPT = ("Read the text below, summarise it in five sentences, then answer: why could the "
                   "keepers' families be cut off in winter, and what replaced the keepers?\n\n" + _ARTICLE)


_REWRITE_PROMPT = ("Rewrite this Node.js module with async/await and the fs.promises API instead of "
                   "callbacks. Keep the behaviour and the exported name; reply with the complete module "
                   "in one code block.\n\n```javascript\n" + _CALLBACKS + "```")


@dataclass(frozen=True)
class Workload:
    """A conversation: the user messages in order. Every turn but the last is answered
    by the target with plain greedy decoding before timing starts; the last is timed."""

    name: str
    turns: tuple[str, ...]

    @property
    def prompt(self) -> str:
        return self.turns[-1]


WORKLOADS = {w.name: w for w in (
    Workload("code", ("Write a Python function that merges overlapping intervals in a list of "
                      "(start, end) pairs, with a docstring and a few pytest tests.",)),
    Workload("edit", (_EDIT_PROMPT,)),
    Workload("rewrite", (_REWRITE_PROMPT,)),
    Workload("qa", (_SUMMARY_PROMPT,)),
    Workload("prose", ("Explain to a curious twelve-year-old how a refrigerator keeps food cold, "
                       "in a few short paragraphs.",)),
    Workload("revise", ("Write a Python class LRUCache with get and put methods and a fixed capacity, "
                        "using OrderedDict.",
                        "Revise your class: add type hints, a docstring for each method, and a "
                        "__len__ method. Reply with the complete revised class.")),
)}


def workload_from_file(path: str | Path) -> Workload:
    """A user workload: the file's text is the user message, its stem the name."""
    path = Path(path)
    text = path.read_text(encoding="utf-8").strip()
    if not text:
        raise ValueError(f"prompt file {path} is empty")
    return Workload(path.stem, (text,))


def select_workloads(names: Sequence[str], prompt_files: Sequence[str | Path]) -> list[Workload]:
    """The built-in workloads named (every one for "all", or when neither a name nor a
    prompt file is given), then one per prompt file (workload_from_file)."""
    every = "all" in names or not (names or prompt_files)
    chosen = [WORKLOADS[n] for n in (WORKLOADS if every else dict.fromkeys(names))]
    return chosen + [workload_from_file(p) for p in prompt_files]


@dataclass(frozen=True)
class Variant:
    """One speculation setting: a method and, for speculative ones, K (draft_max); for
    method draft whether it drafts ahead (None: as the controller chooses); and the CPU
    threads of target and draft (None: as the engine was loaded)."""

    method: str
    draft_max: int | None = None
    async_draft: bool | None = None
    threads: tuple[int, int] | None = None

    @property
    def label(self) -> str:
        label = self.method if self.draft_max is None else f"{self.method} k={self.draft_max}"
        if self.async_draft is not None:
            label += " async" if self.async_draft else " sync"
        if self.threads is not None:  # target threads (+ draft threads)
            label += f" t{self.threads[0]}" + (f"+{self.threads[1]}" if self.method == "draft" else "")
        return label


def variants(methods: Sequence[tuple[str, Sequence[int]]], ks: Sequence[int],
             async_draft: bool | None = None) -> list[Variant]:
    """`none` first (the baseline), then every other method with its own Ks, or else
    every K of `ks` (method draft with `async_draft`)."""
    out = [Variant("none")]
    for m, own in methods:
        if m != "none":
            out += [Variant(m, k, async_draft if m == "draft" else None) for k in dict.fromkeys(own or ks)
                    if Variant(m, k) not in out]
    return out


def async_split_variants(ks: Sequence[int], threads: int) -> list[Variant]:
    """Drafting in turn on all `threads` threads (target and draft each use them all)
    against drafting ahead with the threads split between target and draft, for each K;
    `none` on all threads is the baseline."""
    if threads < 2:
        raise ValueError(f"splitting threads between target and draft needs at least 2, got {threads}")
    split = (threads - threads // 2, threads // 2)
    out = [Variant("none", threads=(threads, threads))]
    for k in dict.fromkeys(ks):
        out += [Variant("draft", k, False, (threads, threads)), Variant("draft", k, True, split)]
    return out


@dataclass
class Row:
    """One workload under one variant: stats summed over the repetitions, and the speed
    ratio to the `none` row of the same workload as the median of per-repetition ratios
    (each repetition runs every variant back to back, so a ratio compares like with like)."""

    workload: str
    variant: Variant | NativeVariant
    stats: Stats
    ratios: list[float] = field(default_factory=list)  # decode tok/s over `none`, one per repetition
    oracle: float | None = None  # `none` rows: the copy oracle's bound on this answer
    native_ratios: list[float] = field(default_factory=list)  # llama.cpp rows: over llama.cpp plain
    # greedy runs, one per repetition: where the answer first differs from `none`'s (its
    # token index), None where it is the same answer
    left_plain_at: list[int | None] = field(default_factory=list)

    @property
    def speedup(self) -> float:
        return float(np.median(self.ratios)) if self.ratios else 0.0

    @property
    def native_speedup(self) -> float:
        return float(np.median(self.native_ratios)) if self.native_ratios else 0.0

    def to_dict(self) -> dict:
        s = self.stats
        return {"workload": self.workload, "variant": self.variant.label, "method": self.variant.method,
                "draft_max": self.variant.draft_max,
                "tokens_per_second": s.decode_tokens_per_second, "speedup": self.speedup,
                "speedups": self.ratios, "copy_oracle": self.oracle, "native_speedup": self.native_speedup,
                "native_speedups": self.native_ratios, "left_plain_at": self.left_plain_at,
                "acceptance_rate": s.acceptance_rate,
                "mean_accepted_length": s.mean_accepted_length, "position_acceptance": s.position_acceptance,
                "overhead_ms_per_round": s.overhead_ms_per_round, "stats": s.to_dict()}


OnRun = Callable[[Workload, Variant | NativeVariant, int, Stats], None]


def run_grid(engine: Engine, workloads: Sequence[Workload], grid: Sequence[Variant], *,
             repetitions: int = 1, max_tokens: int = 128,
             sampling: SamplingConfig = SamplingConfig(temperature=0.0), chat: bool = True,
             native: LlamaCpp | None = None, on_run: OnRun | None = None) -> list[Row]:
    """Generate every workload with every variant `repetitions` times; one Row per pair.
    Variants without their own K take engine.spec's draft_max, and method draft takes its
    draft_p_min.

    Repetition r uses seed sampling.seed + r (when a seed is set). A short warm-up
    generation per variant runs first and is not counted. The `none` row of a workload
    also gets the copy oracle's bound for its first answer (when the engine's cost model
    is calibrated, which any auto or medusa variant does): the speed ratio a drafter
    copying from the prompt and output with perfect foresight would reach at the largest
    draft length of the grid. With `native`, every llama.cpp mode runs the same prompt text
    right after ggspec's variants in each repetition; its rows get ratios to ggspec's
    `none` and to llama.cpp's plain decoding of the same repetition. Odd repetitions run
    the variants (llama.cpp's modes included) in reverse order. Greedy, each ggspec row
    also records where its answer left `none`'s (an exact method leaves it only at a
    near-tie that a batch's rounding decides otherwise; its ratio then times another text).
    """
    if repetitions < 1:
        raise ValueError(f"repetitions must be at least 1, got {repetitions}")
    if not workloads:
        raise ValueError("no workload to run")
    texts = [_prompt_text(engine, w, chat, max_tokens) for w in workloads]
    prompts = [engine.tokenize(text) for text in texts]
    specs = [SpecConfig(v.method, draft_max=v.draft_max or engine.spec.draft_max, draft_p_min=engine.spec.draft_p_min,
                        async_draft=v.async_draft) for v in grid]
    loaded = engine.threads
    for variant, spec in zip(grid, specs):
        engine.set_threads(*(variant.threads or loaded))
        engine.prepare(spec, progress=True)  # (a first generation would measure the costs in its timed rounds)
        engine.generate(prompts[0], max_tokens=min(8, max_tokens), sampling=sampling, spec=spec)
    natives = native.variants() if native is not None else []
    rows = [[Row(w.name, v, Stats(method=v.method)) for v in [*grid, *natives]] for w in workloads]
    runs = list(enumerate([*grid, *natives]))  # (column, variant): ggspec's, then llama.cpp's
    for r in range(repetitions):
        seeded = sampling if sampling.seed is None else replace(sampling, seed=sampling.seed + r)
        for i, (workload, prompt) in enumerate(zip(workloads, prompts)):
            speeds = np.zeros(len(runs))
            answers: dict[int, list[int]] = {}
            # every other repetition runs the variants in reverse order: a steady drift in
            # the machine's speed then favours none of them in the medians
            for j, variant in (runs if r % 2 == 0 else runs[::-1]):
                if j < len(grid):
                    engine.set_threads(*(variant.threads or loaded))
                    result = engine.generate(prompt, max_tokens=max_tokens, sampling=seeded, spec=specs[j])
                    stats = result.stats
                    answers[j] = result.tokens
                    if r == 0 and variant.method == "none":
                        rows[i][j].oracle = _oracle(engine, prompt, result.tokens, max(s.draft_max for s in specs))
                else:
                    stats = _native_stats(native.run(variant, texts[i], max_tokens, seeded), variant, workload, prompt)
                rows[i][j].stats = stats if r == 0 else rows[i][j].stats + stats
                speeds[j] = stats.decode_tokens_per_second
                if on_run is not None:
                    on_run(workload, variant, r, stats)
            if grid[0].method == "none" and speeds[0] > 0:
                for j, speed in enumerate(speeds):
                    rows[i][j].ratios.append(float(speed / speeds[0]))
            if grid[0].method == "none" and sampling.temperature == 0:
                for j, answer in answers.items():
                    rows[i][j].left_plain_at.append(first_difference(answer, answers[0]))
            native_speeds = speeds[len(grid):]
            if len(native_speeds) and natives[0].mode == "plain" and native_speeds[0] > 0:
                for j, speed in enumerate(native_speeds, start=len(grid)):
                    rows[i][j].native_ratios.append(float(speed / native_speeds[0]))
    engine.set_threads(*loaded)
    return [row for per_workload in rows for row in per_workload]


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The first index where two token lists differ (one ending before the other counts),
    None when they are equal."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def _native_stats(run: NativeRun, variant: NativeVariant, workload: Workload, prompt: list[int]) -> Stats:
    """A llama.cpp run as Stats, after checking that it read the prompt as ggspec did."""
    if run.prompt_tokens != len(prompt):
        raise GgspecError(f"{variant.binary} read the {workload.name} prompt as {run.prompt_tokens} tokens, "
                          f"ggspec as {len(prompt)}: the two runs would not be comparable")
    return Stats(method=variant.method, prefill_tokens=run.prompt_tokens, generated_tokens=run.tokens,
                 decode_seconds=run.seconds, draft_tokens=run.drafted, accepted_tokens=run.accepted)


def _oracle(engine: Engine, prompt: list[int], output: list[int], k_max: int) -> float | None:
    if not engine.costs.calibrated or engine.costs.max_rows < k_max + 1:
        return None
    return oracle_speedup(copyable(prompt, output), engine.costs, k_max)


def _prompt_text(engine: Engine, workload: Workload, chat: bool, max_tokens: int) -> str:
    """The timed turn's prompt text (chat-templated unless raw), after the earlier turns are
    answered (plain greedy)."""
    if not (chat and engine.target.chat_template):
        return "\n\n".join(workload.turns)
    messages: list[dict] = []
    for turn in workload.turns[:-1]:
        messages.append({"role": "user", "content": turn})
        answer = engine.generate(messages, max_tokens=max_tokens, sampling=SamplingConfig(temperature=0.0),
                                 spec=SpecConfig("none"))
        messages.append({"role": "assistant", "content": answer.text})
    return engine.target.apply_chat_template([*messages, {"role": "user", "content": workload.turns[-1]}])


def table(rows: Sequence[Row]) -> str:
    """Rows as an aligned text table; with llama.cpp rows, a column of their speed ratio to
    llama.cpp's plain decoding."""
    native = any(r.native_ratios for r in rows)
    greedy = any(r.left_plain_at for r in rows)
    head = ("workload", "method", "tok/s", "x none", *(("x llama.cpp",) if native else ()),
            *(("answer",) if greedy else ()), "accept", "acc/round", "by position", "ovh ms/rd")
    body = []
    for row in rows:
        s = row.stats
        spec = s.draft_tokens > 0
        body.append((row.workload, row.variant.label, f"{s.decode_tokens_per_second:.1f}",
                     f"{row.speedup:.2f}" if row.speedup else "-",
                     *((f"{row.native_speedup:.2f}" if row.native_speedup else "-",) if native else ()),
                     *((_answer(row.left_plain_at),) if greedy else ()),
                     f"{100 * s.acceptance_rate:.0f}%" if spec else "-",
                     f"{s.mean_accepted_length:.2f}" if s.draft_rounds else "-",
                     " ".join(f"{a:.2f}" for a in s.position_acceptance) or "-",
                     f"{s.overhead_ms_per_round:.2f}" if s.rounds else "-"))
    widths = [max(len(r[c]) for r in (head, *body)) for c in range(len(head))]
    left = {0, 1, len(head) - 2}
    lines = ["  ".join(v.ljust(w) if c in left else v.rjust(w) for c, (v, w) in enumerate(zip(r, widths))).rstrip()
             for r in (head, *body)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if any(_answer(r.left_plain_at) not in ("same", "-") for r in rows):
        lines.append("answer: repetitions whose greedy answer left plain decoding's, at the earliest token "
                     "where one did (a near-tie that a batch's rounding decided otherwise: the ratio times "
                     "another text)")
    bounds = [f"{r.workload} {r.oracle:.2f}x" for r in rows if r.oracle is not None]
    if bounds:
        lines.append("copy oracle (every copyable token drafted and accepted, at this machine's cost curve): "
                     + ", ".join(bounds))
    return "\n".join(lines)


def _answer(left_plain_at: Sequence[int | None]) -> str:
    """A row's answers against plain decoding's: "same", or how many of the repetitions'
    left it and the earliest token where one did."""
    left = [i for i in left_plain_at if i is not None]
    if not left_plain_at:
        return "-"
    return f"{len(left)}/{len(left_plain_at)} @{min(left)}" if left else "same"


def pyplot():
    """matplotlib.pyplot on a file-only backend; GgspecError saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise GgspecError("plotting needs matplotlib: pip install 'ggspec[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot(rows: Sequence[Row], path: str | Path) -> None:
    """Save a PNG: decode tok/s by workload and variant, and acceptance by draft position."""
    plt = pyplot()
    names = list(dict.fromkeys(r.workload for r in rows))
    labels = list(dict.fromkeys(r.variant.label for r in rows))
    fig, (bars, lines) = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.8 / len(labels)
    for j, label in enumerate(labels):
        tps = {r.workload: r.stats.decode_tokens_per_second for r in rows if r.variant.label == label}
        colour = f"C{j}"  # one colour per variant in both panels
        bars.bar([i + j * width for i in range(len(names))], [tps.get(n, 0.0) for n in names], width,
                 label=label, color=colour)
        pos = _sum(r.stats for r in rows if r.variant.label == label).position_acceptance
        if pos:
            lines.plot(range(1, len(pos) + 1), pos, marker="o", label=label, color=colour)
    bars.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names)
    bars.set_ylabel("decode tokens / s")
    bars.set_title("Speed by workload")
    bars.legend(fontsize="small")
    lines.set_xlabel("draft position")
    lines.xaxis.get_major_locator().set_params(integer=True)
    lines.set_ylabel("acceptance rate")
    lines.set_ylim(0, 1.05)
    lines.set_title("Acceptance by draft position (all workloads)")
    if lines.has_data():
        lines.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _sum(stats) -> Stats:
    total = None
    for s in stats:
        total = s if total is None else total + s
    return total or Stats()
