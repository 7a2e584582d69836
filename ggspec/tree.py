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

import heapq
from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

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


def trie(chains: Sequence[Sequence[int]]) -> tuple[list[int], list[int], list[list[int]]]:
    """Merge token chains into a trie: (tokens, parents, through), nodes listed parents
    first, through[i] the indices of the chains that pass node i. A node's children are
    listed in the order of the first chain through each."""
    tokens: list[int] = []
    parents: list[int] = []
    through: list[list[int]] = []
    index: dict[tuple[int, int], int] = {}  # (parent, token) -> node
    for c, chain in enumerate(chains):
        parent = -1
        for token in chain:
            node = index.get((parent, token))
            if node is None:
                node = index[parent, token] = len(tokens)
                tokens.append(token)
                parents.append(parent)
                through.append([])
            through[node].append(c)
            parent = node
    return tokens, parents, through


# Tree shapes as Medusa writes them: each node is the tuple of candidate ranks along its
# path (node (0, 1) is head 1's second-best token after head 0's best). A shape is
# prefix-closed; nodes are listed parents first.
Choices = list[tuple[int, ...]]

# Medusa's sparse tree: the first 24 nodes of mc_sim_7b_63 in the Medusa repository
MEDUSA_SPARSE: Choices = [
    (0,), (0, 0), (1,), (0, 1), (2,), (0, 0, 0), (1, 0), (0, 2), (3,), (0, 3), (4,), (0, 4),
    (2, 0), (0, 5), (0, 0, 1), (5,), (0, 6), (6,), (0, 7), (0, 1, 0), (1, 1), (7,), (0, 8),
    (0, 0, 2),
]


def chain_choices(n: int) -> Choices:
    return [(0,) * d for d in range(1, n + 1)]


def cartesian_choices(k: int, depth: int) -> Choices:
    """Every path of the top-k candidates of each head, down to `depth`."""
    out: Choices = []
    level: Choices = [()]
    for _ in range(depth):
        level = [path + (r,) for path in level for r in range(k)]
        out += level
    return out


def fixed_choices(shape: Choices, acceptance: np.ndarray, budget: int) -> tuple[Choices, np.ndarray]:
    """The first `budget` nodes of a fixed shape that these heads can fill (depth at most
    n_heads, rank below top_k), and each node's chance: the product along its path."""
    n_heads, top_k = acceptance.shape
    nodes = [c for c in shape if len(c) <= n_heads and max(c) < top_k][:budget]
    return nodes, np.array([np.prod(acceptance[np.arange(len(c)), list(c)]) for c in nodes])


def grown_choices(acceptance: np.ndarray, budget: int) -> tuple[Choices, np.ndarray]:
    """The `budget` nodes with the highest chance of being accepted, and those chances.

    acceptance (n_heads, top_k): the chance that head d's rank-r candidate is accepted
    given its parent was. A node's chance is the product along its path, which never grows
    with depth, so taking nodes best-first keeps every parent before its children and
    maximises the expected accepted length sum(chances) for the node budget."""
    n_heads, top_k = acceptance.shape
    frontier = [(-acceptance[0, r], (r,)) for r in range(top_k)]
    heapq.heapify(frontier)
    out: Choices = []
    chances = []
    while frontier and len(out) < budget:
        neg, path = heapq.heappop(frontier)
        out.append(path)
        chances.append(-neg)
        if len(path) < n_heads:
            for r in range(top_k):
                heapq.heappush(frontier, (neg * acceptance[len(path), r], path + (r,)))
    return out, np.array(chances)


def tree_from_choices(choices: Choices) -> tuple[Tree, np.ndarray]:
    """The Tree of a shape and each node's rank at its depth: (tree, ranks (n,))."""
    index = {path: i for i, path in enumerate(choices)}
    parents = []
    for path in choices:
        if len(path) > 1 and path[:-1] not in index:
            raise ValueError(f"tree shape lists {path} without its parent {path[:-1]}")
        parents.append(index[path[:-1]] if len(path) > 1 else -1)
    return Tree(tuple(parents)), np.array([path[-1] for path in choices], dtype=np.int64)


# the shapes a Medusa drafter can use: None grows the tree from measured acceptance
TREE_SHAPES: dict[str, Choices | None] = {
    "grown": None,
    "chain": chain_choices(8),
    "cartesian": cartesian_choices(2, 4),
    "sparse": MEDUSA_SPARSE,
}
