"""Drafters propose tokens for the target to verify.

A drafter has two verbs, `propose(tokens, budget, sampling, rng) -> Draft`: given every
committed token so far (the prompt, then the output), propose at most `budget` next
tokens; and `accept(draft, nodes)`: the verdict on that draft (the draft carries the
drafter's own plan, so a drafter need not remember what it proposed). Drafters that keep
state (a KV cache, an index) bring it in line with `tokens` themselves, so a rejected
draft or a new prompt needs no extra call. Costs are measured by the engine, which owns
the one CostModel that drafters choose by.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np

from ..config import SamplingConfig
from ..sampling import Dist
from ..tree import Tree


@dataclass(frozen=True)
class Draft:
    """Proposed tokens: a chain, or with `tree` a token tree (tokens[i] is node i).

    q, for chains only: the warped draft distribution each token was sampled from, one
    per token (ids, probabilities: sampling.Dist); None when the drafter has none (prompt
    lookup, heads' top-k): such drafts are verified by sample-and-match."""

    tokens: list[int]
    q: list[Dist] | None = None
    tree: Tree | None = None
    plan: Any = None  # the drafter's own record of how it drafted, handed back to accept()


class Drafter(Protocol):
    name: str

    def prepare(self, tokens: Sequence[int]) -> None:
        """Prefill: take in a new prompt before the first round (may do nothing)."""

    def propose(self, tokens: Sequence[int], budget: int, sampling: SamplingConfig,
                rng: np.random.Generator) -> Draft:
        """Propose up to `budget` tokens to follow `tokens`."""

    def accept(self, draft: Draft, nodes: Sequence[int]) -> None:
        """The target accepted these nodes of `draft` (for a chain: its first len(nodes)
        tokens)."""
