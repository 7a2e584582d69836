"""Token trees: a draft of several candidate continuations verified in one batch.

Node i holds a drafted token; parents[i] is its parent node, or -1 when it follows the
pending token directly. Nodes are listed parents-first (parents[i] < i). A chain is the
tree whose parents are -1, 0, 1, ...

For one llama_decode, each root-to-leaf path gets a sequence id (path 0 uses sequence 0,
where the committed tokens live; the others see the committed prefix through seq_cp). A
row carries the ids of every path through it, first one of them: llama.cpp masks a query
by its first sequence id against each key's set, so a node attends exactly to its
ancestors, the pending token and the committed prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np


@dataclass(frozen=True)
class Tree:
    parents: tuple[int, ...]

    def __post_init__(self) -> None:
        if any(not -1 <= p < i for i, p in enumerate(self.parents)):
            raise ValueError(f"parents must list each parent before its children: {self.parents}")

    @classmethod
    def chain(cls, n: int) -> Tree:
        return cls(tuple(range(-1, n - 1)))

    def __len__(self) -> int:
        return len(self.parents)

    @cached_property
    def depths(self) -> np.ndarray:
        """(n,): 1 for children of the pending token."""
        d = np.zeros(len(self), dtype=np.int64)
        for i, p in enumerate(self.parents):
            d[i] = 1 if p < 0 else d[p] + 1
        return d

    @cached_property
    def children(self) -> list[list[int]]:
        """children[0] are the pending token's children; children[i + 1] are node i's."""
        out: list[list[int]] = [[] for _ in range(len(self) + 1)]
        for i, p in enumerate(self.parents):
            out[p + 1].append(i)
        return out

    @cached_property
    def paths(self) -> list[list[int]]:
        """Root-to-leaf node lists, in leaf order."""
        leaves = [i for i in range(len(self)) if not self.children[i + 1]]
        return [self.path_to(leaf) for leaf in leaves]

    def path_to(self, node: int) -> list[int]:
        out = []
        while node >= 0:
            out.append(node)
            node = self.parents[node]
        return out[::-1]

    @cached_property
    def is_chain(self) -> bool:
        return all(p == i - 1 for i, p in enumerate(self.parents))

    def seq_ids(self) -> list[list[int]]:
        """Sequence ids per batch row: row 0 the pending token, row i + 1 node i."""
        rows: list[list[int]] = [[] for _ in range(len(self) + 1)]
        for s, path in enumerate(self.paths or [[]]):
            rows[0].append(s)
            for node in path:
                rows[node + 1].append(s)
        return rows

    def path_with(self, nodes: list[int]) -> int:
        """Index of a path that contains the accepted `nodes` (a root path prefix)."""
        if not nodes:
            return 0
        return next(s for s, path in enumerate(self.paths) if path[:len(nodes)] == nodes)
