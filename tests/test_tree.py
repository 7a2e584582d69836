"""Token trees: structure, one-batch verification against sequential evaluation, and
tree speculation inside the engine (exact greedy and sampled)."""

from __future__ import annotations

import numpy as np
import pytest

from ggspec import BackendConfig, Engine, SamplingConfig, SpecConfig
from ggspec.backend import Context
from ggspec.drafters import Draft
from ggspec.tree import Tree, trie
from reference import first_divergence, greedy_reference
from test_engine import END, exact_first_two, random_prompt, sample_first_two
from tinymodels import VOCAB

CFG = BackendConfig(n_ctx=512, n_batch=64, n_threads=1)
TREE = Tree((-1, -1, 0, 0, 1, 2, 2, 4, -1))  # 9 nodes, 5 leaves, height 4


def test_tree_structure():
    assert TREE.depths.tolist() == [1, 1, 2, 2, 2, 3, 3, 3, 1]
    assert TREE.paths == [[0, 3], [0, 2, 5], [0, 2, 6], [1, 4, 7], [8]]
    rows = TREE.seq_ids()
    assert rows[0] == [0, 1, 2, 3, 4]   # the pending token is on every path
    assert rows[1] == [0, 1, 2]         # node 0
    assert rows[9] == [4]               # node 8
    assert TREE.path_with([1, 4]) == 3 and TREE.path_with([]) == 0
    assert Tree.chain(3).is_chain and not TREE.is_chain
    with pytest.raises(ValueError):
        Tree((1, -1))


def test_tree_batch_logits_equal_sequential_evaluation_of_each_path(target_path):
    from ggspec.backend import Model
    prompt = random_prompt(30)
    rng = np.random.default_rng(0)
    tokens = [int(t) for t in rng.integers(300, VOCAB.n_vocab - 10, len(TREE))]
    with Model(target_path, CFG) as model, Context(model, CFG, n_seq_max=8) as ctx:
        ctx.eval(prompt[:-1], logits="none")
        rows = ctx.eval_tree([prompt[-1], *tokens], TREE).copy()
        for node in range(len(TREE)):
            path = [tokens[i] for i in TREE.path_to(node)]
            ref = greedy_reference(target_path, prompt, 1, forced=path).logits[0]
            # batched and single-token kernels differ by ~1e-3 here; a node that saw one
            # token more or less than its ancestors would be off by far more
            np.testing.assert_allclose(rows[node + 1], ref, atol=1e-2, err_msg=f"node {node}")
            wrong = greedy_reference(target_path, prompt, 1, forced=[tokens[8], *path]).logits[0]
            assert np.abs(rows[node + 1] - wrong).max() > 0.1
        # keep path 3's first two nodes (1, 4): the cache then equals a sequential prefill
        ctx.keep_path(3, [tokens[1], tokens[4]])
        assert ctx.tokens == prompt + [tokens[1], tokens[4]]
        nxt = ctx.eval([tokens[7]])[0]
        ref = greedy_reference(target_path, prompt, 1, forced=[tokens[1], tokens[4], tokens[7]]).logits[0]
        np.testing.assert_allclose(nxt, ref, atol=1e-2)


class TreeDrafter:
    """Test drafter: the TREE shape, each node's token the reference continuation's token
    at its depth with probability `hit`, else a random token."""

    name = "tree"

    def __init__(self, reference: list[int], prompt_len: int, hit: float, seed: int = 0):
        self.reference, self.prompt_len, self.hit = reference, prompt_len, hit
        self.rng = np.random.default_rng(seed)

    def prepare(self, tokens):
        pass

    def propose(self, tokens, budget, sampling, rng):
        done = len(tokens) - self.prompt_len
        out = []
        for d in TREE.depths:
            i = done + d - 1
            good = i < len(self.reference) and self.rng.random() < self.hit
            out.append(self.reference[i] if good else int(self.rng.integers(300, VOCAB.n_vocab - 10)))
        return Draft(out, tree=TREE)

    def accept(self, nodes, verify_seconds):
        pass


@pytest.fixture(scope="module")
def tree_engine(target_path):
    with Engine(target_path, None, target_config=CFG, max_tree_paths=8) as e:
        yield e


@pytest.mark.parametrize("seed", range(6))
def test_greedy_tree_speculation_equals_plain_greedy_decoding(tree_engine, target_path, monkeypatch, seed):
    prompt = random_prompt(40 + seed)
    ref = greedy_reference(target_path, prompt, 40)
    monkeypatch.setitem(tree_engine.drafters, "lookup", TreeDrafter(ref.tokens, len(prompt), hit=0.6, seed=seed))
    got = tree_engine.generate(prompt, max_tokens=40, sampling=SamplingConfig(temperature=0),
                               spec=SpecConfig("lookup", draft_max=8))
    assert first_divergence(got.tokens, ref) is None
    assert got.stats.accepted_tokens > 10  # the tree paths were really followed
    # the KV cache holds the committed tokens (and maybe accepted ones past max_tokens)
    committed = prompt + got.tokens
    ctx = tree_engine.ctx
    assert ctx.tokens[:len(committed) - 1] == committed[:-1]
    ctx.truncate(len(committed) - 1)
    nxt = ctx.eval(committed[-1:])[0]
    ref_next = greedy_reference(target_path, prompt, 1, forced=got.tokens).logits[0]
    np.testing.assert_allclose(nxt, ref_next, atol=1e-2)


def test_sampled_tree_speculation_follows_the_target_distribution(tree_engine, target_path, monkeypatch):
    n = 20_000
    prompt = random_prompt(50, 6)
    p1, p2 = exact_first_two(target_path, prompt, 0.9, 0)
    # candidates: the target's three likeliest first tokens and likely second tokens
    first = [int(t) for t in np.argsort(p1[:END])[::-1][:3]]
    seconds = greedy_reference(target_path, prompt + [first[0]], 3).tokens

    class Fixed(TreeDrafter):
        def propose(self, tokens, budget, sampling, rng):
            nodes = [first[0], first[1], seconds[0], seconds[1], seconds[0], seconds[1], seconds[2],
                     seconds[2], first[2]]
            return Draft(nodes, tree=TREE)

    monkeypatch.setitem(tree_engine.drafters, "lookup", Fixed([], 0, 0))
    sampling = dict(temperature=0.9, top_k=0, top_p=1.0, min_p=0.0)
    stats = sample_first_two(tree_engine, prompt, n, sampling, SpecConfig("lookup"), (p1, p2))
    assert stats.accepted_tokens > n / 3


def test_trie_merges_chains_sharing_prefixes():
    tokens, parents, through = trie([[1, 2, 3], [1, 2, 4, 5], [6], [1, 2, 3]])
    assert tokens == [1, 2, 3, 4, 5, 6]
    assert parents == [-1, 0, 1, 1, 3, -1]
    assert through == [[0, 1, 3], [0, 1, 3], [0, 3], [1], [1], [2]]
    assert Tree(tuple(parents)).paths == [[0, 1, 2], [0, 1, 3, 4], [5]]


@pytest.mark.parametrize("seed", range(3))
def test_copy_trees_in_auto_equal_plain_greedy_decoding(target_path, monkeypatch, seed):
    """A prompt that ends with two tokens it had four times, each followed by another
    continuation: with
    verification made cheap and other sources made likely, auto drafts candidate trees,
    and commits exactly the target's greedy tokens."""
    rng = np.random.default_rng(seed)
    phrases = [[int(t) for t in rng.integers(300, VOCAB.n_vocab - 10, 6)] for _ in range(4)]
    prompt = [VOCAB.bos_id] + [t for p in phrases for t in [11, 12, *p]] + [13, 11, 12]
    ref = greedy_reference(target_path, prompt, 40)
    with Engine(target_path, None, target_config=CFG, max_tree_paths=4) as e:
        auto = e.drafters["auto"]
        e.prepare(SpecConfig("auto"))  # calibrates
        t1 = float(auto.costs.t_verify(1))
        monkeypatch.setattr(auto.costs, "curve", np.full(auto.costs.max_rows, t1))
        monkeypatch.setattr(auto.costs, "correction", np.ones(auto.costs.max_rows))
        monkeypatch.setattr(auto.costs, "observe_verify", lambda *args: None)
        monkeypatch.setattr(auto.copy_acceptance, "observe_alternative", lambda right: None)
        auto.copy_acceptance.alternative = 0.9
        got = e.generate(prompt, max_tokens=40, sampling=SamplingConfig(temperature=0),
                         spec=SpecConfig("auto", draft_max=8))
    assert first_divergence(got.tokens, ref) is None
    assert any(",paths=" in plan for plan in got.stats.controller["plans"])


def rows_for(tree: Tree, n_vocab: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 2, (len(tree) + 1, n_vocab))


def test_tree_greedy_follows_argmax_children():
    from ggspec.acceptance import accept_tree_greedy
    rows = rows_for(TREE, 6, 0)
    top = rows.argmax(axis=1)
    tokens = [(int(top[0]) + 1) % 6] * len(TREE)
    tokens[1] = int(top[0])             # node 1 (root child) matches
    tokens[4] = int(top[2])             # node 4 (child of 1) matches
    tokens[7] = (int(top[5]) + 1) % 6   # node 7 (child of 4) does not
    v = accept_tree_greedy(rows, tokens, TREE)
    assert v.nodes == (1, 4) and v.token == int(top[5])


def test_tree_match_commits_the_targets_own_samples():
    from ggspec.acceptance import accept_tree_match
    from reference import sample, warp
    cfg = SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    rows = rows_for(TREE, 6, 1)
    for seed in range(200):
        tokens = list(np.random.default_rng(seed).integers(0, 6, len(TREE)))
        v = accept_tree_match(rows, tokens, TREE, cfg, np.random.default_rng(seed))
        # replay: the same draws give the same walk, sampling p at each visited row
        rng, row = np.random.default_rng(seed), 0
        for node in v.nodes:
            assert sample(warp(rows[row], cfg), rng) == tokens[node]
            row = node + 1
        assert sample(warp(rows[row], cfg), rng) == v.token
        assert v.token not in [tokens[c] for c in TREE.children[row]]


def test_typical_acceptance_is_lossy_and_only_used_when_asked(tree_engine, monkeypatch):
    import ggspec.engine
    called = []
    monkeypatch.setattr(ggspec.engine, "accept_tree_typical", lambda *a, **k: called.append(1) or None)
    prompt = random_prompt(60)
    monkeypatch.setitem(tree_engine.drafters, "lookup", TreeDrafter([], len(prompt), hit=0.0))
    tree_engine.generate(prompt, max_tokens=5, spec=SpecConfig("lookup"))
    assert not called


def test_tree_shapes():
    from ggspec.tree import TREE_SHAPES, fixed_choices, grown_choices, tree_from_choices
    acceptance = np.array([[0.6, 0.2, 0.1], [0.5, 0.2, 0.1], [0.4, 0.1, 0.1]])
    grown, chances = grown_choices(acceptance, 6)
    assert grown == [(0,), (0, 0), (1,), (0, 0, 0), (0, 1), (1, 0)]
    np.testing.assert_allclose(chances, [0.6, 0.3, 0.2, 0.12, 0.12, 0.1])
    for name, shape in TREE_SHAPES.items():
        if shape is None:
            continue
        nodes, chances = fixed_choices(shape, acceptance, 20)
        tree, ranks = tree_from_choices(nodes)  # parents first, heads and ranks in range
        assert len(tree) == len(nodes) and tree.depths.max() <= 3 and ranks.max() < 3, name
        assert np.all(chances <= 0.6)
    with pytest.raises(ValueError, match="parent"):
        tree_from_choices([(0, 1)])
