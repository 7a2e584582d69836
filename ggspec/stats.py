"""Statistics of a generation: data first, formatting in one place."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class Stats:
    """What one generation (or, summed with `+`, a session) did and how long it took.

    A round is one target verification. In a speculative round the drafter proposed
    `k` tokens, the target accepted the first `n` of them and then committed one token of
    its own, so a round commits n + 1 tokens.
    """

    method: str = "none"
    prefill_tokens: int = 0          # prompt tokens processed (the rest came from the KV cache)
    cached_tokens: int = 0           # prompt tokens reused from the KV cache
    prefill_seconds: float = 0.0
    generated_tokens: int = 0
    rounds: int = 0
    draft_rounds: int = 0            # rounds in which at least one token was drafted
    draft_tokens: int = 0            # tokens proposed by the drafter
    accepted_tokens: int = 0         # of those, accepted by the target
    decode_seconds: float = 0.0      # wall time after prefill
    draft_seconds: float = 0.0       # time spent proposing (drafter's llama.cpp + Python)
    verify_seconds: float = 0.0      # time in the target's verification decodes
    llama_seconds: float = 0.0       # time waiting on llama.cpp: inside llama_decode, target and
                                     # draft, or for the draft model drafting ahead
    ahead_rounds: int = 0            # rounds whose verification ran with the draft model drafting ahead
    ahead_drafts: int = 0            # rounds whose draft was drafted ahead (the guess held)
    finish_reason: str = ""
    accepted_length_histogram: list[int] = field(default_factory=list)  # [n] -> draft rounds accepting n
    position_proposed: list[int] = field(default_factory=list)          # [i] -> rounds drafting position i
    position_accepted: list[int] = field(default_factory=list)          # [i] -> rounds accepting position i
    controller: dict | None = None   # method auto: the controller's estimates and choices

    def record_round(self, proposed: int, accepted: int, depth: int) -> None:
        """A round drafted `proposed` tokens reaching `depth` positions ahead (a chain:
        depth == proposed; a tree: its height), of which the target accepted `accepted`
        that reached the output (none past an end of generation or a stop string)."""
        self.rounds += 1
        self.draft_tokens += proposed
        self.accepted_tokens += accepted
        if proposed == 0:
            return
        self.draft_rounds += 1
        _bump(self.accepted_length_histogram, accepted)
        for counts, n in ((self.position_proposed, depth), (self.position_accepted, min(accepted, depth))):
            counts.extend([0] * (n - len(counts)))
            for i in range(n):
                counts[i] += 1

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Draft tokens accepted per speculative round (the bonus token not counted)."""
        return self.accepted_tokens / self.draft_rounds if self.draft_rounds else 0.0

    @property
    def tokens_per_round(self) -> float:
        """Tokens committed per target verification (1.0 for plain decoding)."""
        return self.generated_tokens / self.rounds if self.rounds else 0.0

    @property
    def position_acceptance(self) -> list[float]:
        """Acceptance rate by draft position, among rounds that drafted that position."""
        return [a / p for p, a in _zip_pad(self.position_proposed, self.position_accepted) if p]

    @property
    def overhead_seconds(self) -> float:
        """Decode time not spent inside llama_decode: the engine's own Python work."""
        return max(0.0, self.decode_seconds - self.llama_seconds)

    @property
    def overhead_ms_per_round(self) -> float:
        return 1000 * self.overhead_seconds / self.rounds if self.rounds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.generated_tokens / self.decode_seconds if self.decode_seconds else 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        for name in ("acceptance_rate", "mean_accepted_length", "tokens_per_round", "position_acceptance",
                     "overhead_seconds", "overhead_ms_per_round", "decode_tokens_per_second"):
            out[name] = getattr(self, name)
        return out

    def __add__(self, other: Stats) -> Stats:
        total = Stats(method=self.method if self.method == other.method else "mixed",
                      finish_reason=other.finish_reason)
        for f in fields(Stats):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, list):
                setattr(total, f.name, [x + y for x, y in _zip_pad(a, b)])
            elif f.name == "controller":
                total.controller = b
            elif f.name not in ("method", "finish_reason"):
                setattr(total, f.name, a + b)
        return total


def _bump(counts: list[int], i: int) -> None:
    counts.extend([0] * (i + 1 - len(counts)))
    counts[i] += 1


def _zip_pad(a: list[int], b: list[int]):
    n = max(len(a), len(b))
    return zip(a + [0] * (n - len(a)), b + [0] * (n - len(b)))


def footer(s: Stats) -> str:
    """One line for after an answer."""
    n = s.generated_tokens
    line = f"{n} token{'' if n == 1 else 's'}, {s.decode_tokens_per_second:.1f} tok/s"
    if s.draft_tokens:
        line += (f", {100 * s.acceptance_rate:.0f}% accepted, "
                 f"{s.mean_accepted_length:.2f} accepted/round")
    return f"{line}, {s.method}"


def report(s: Stats) -> str:
    """Every figure, one per line."""
    pos = " ".join(f"{r:.2f}" for r in s.position_acceptance) or "-"
    hist = " ".join(f"{n}:{c}" for n, c in enumerate(s.accepted_length_histogram)) or "-"
    rows = [
        ("method", s.method),
        ("finish reason", s.finish_reason or "-"),
        ("prefill", f"{s.prefill_tokens} tokens in {s.prefill_seconds:.3f} s ({s.cached_tokens} cached)"),
        ("generated", f"{s.generated_tokens} tokens in {s.decode_seconds:.3f} s "
                      f"({s.decode_tokens_per_second:.2f} tok/s)"),
        ("rounds", f"{s.rounds} ({s.tokens_per_round:.2f} tokens/round)"),
        ("drafted", f"{s.draft_tokens} tokens, {s.accepted_tokens} accepted ({100 * s.acceptance_rate:.1f}%)"),
        ("accepted/round", f"{s.mean_accepted_length:.2f}"),
        ("by position", pos),
        ("histogram", hist),
        ("time", f"draft {s.draft_seconds:.3f} s, verify {s.verify_seconds:.3f} s, "
                 f"overhead {s.overhead_ms_per_round:.2f} ms/round"),
    ]
    if s.ahead_rounds:
        rows.insert(-1, ("drafted ahead", f"during {s.ahead_rounds} verifications, used in {s.ahead_drafts} rounds"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
