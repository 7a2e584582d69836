"""Drafters propose tokens for the target to verify.

A drafter has two verbs, `propose(tokens, budget, sampling, rng) -> Draft`: given every
committed token so far (the prompt, then the output), propose at most `budget` next
tokens; and `accept(n_accepted, verify_seconds)`: how the target's verification of that
draft went. Drafters that keep state (a KV cache, an index) bring it in line with `tokens`
themselves, so a rejected draft or a new prompt needs no extra call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from ..config import SamplingConfig


@dataclass(frozen=True)
class Draft:
    """A chain of proposed tokens and, when the drafter has one, the warped draft
    distribution each was sampled from: q has shape (len(tokens), n_vocab), or is None
    (prompt lookup: verified by sample-and-match)."""

    tokens: list[int]
    q: np.ndarray | None = None


class Drafter(Protocol):
    name: str

    def prepare(self, tokens: Sequence[int]) -> None:
        """Prefill: take in a new prompt before the first round (may do nothing)."""

    def propose(self, tokens: Sequence[int], budget: int, sampling: SamplingConfig,
                rng: np.random.Generator) -> Draft:
        """Propose up to `budget` tokens to follow `tokens`."""

    def accept(self, n_accepted: int, verify_seconds: float) -> None:
        """The target accepted the first n_accepted tokens of the last draft; verifying
        them took verify_seconds."""
