"""Method `eagle` in the engine: an EAGLE-3 draft (eagle3 GGUF) grows EAGLE-2 dynamic
trees from the target's tapped layer inputs (an EAGLE-1/2 draft, eagle1 GGUF, from its
last hidden states); the target verifies each tree in one batch;
greedy output equals plain greedy decoding and sampled output follows the target."""

from __future__ import annotations

import numpy as np
import pytest

from ggspec import BackendConfig, Engine, SamplingConfig, SpecConfig
from ggspec.errors import ModelFileError
from reference import first_divergence, greedy_reference
from test_engine import random_prompt
from test_medusa import fix_costs
from tinymodels import write_tiny_eagle, write_tiny_eagle1

CFG = BackendConfig(n_ctx=512, n_batch=64, n_threads=1)


@pytest.fixture(scope="module")
def eagle_path(tmp_path_factory, target_path):
    """A random draft over a reduced vocabulary of 300 tokens, the target's own embedding
    and its own output, reading the inputs of the target's layers 0 and 1."""
    return write_tiny_eagle(tmp_path_factory.mktemp("eagle") / "eagle.gguf", target_path,
                            draft_vocab=300, own_embd=False)


@pytest.fixture(scope="module", params=["numpy", "llama", "eagle1"])
def eagle_engine(request, target_path, eagle_path, tmp_path_factory):
    """Trees of a fixed 16 nodes, whatever they cost (a random draft rarely pays), the
    EAGLE-3 draft evaluated by numpy or by llama.cpp's eagle3 graph, or an EAGLE-1/2 draft
    with fc and q/k/v biases (numpy; the target's last hidden states as features)."""
    path, backend = eagle_path, request.param
    if request.param == "eagle1":
        path, backend = write_tiny_eagle1(tmp_path_factory.mktemp("eagle1") / "eagle1.gguf", target_path), "numpy"
    with Engine(target_path, None, target_config=CFG, eagle=path, tree_nodes=16,
                eagle_backend=backend) as e:
        assert e.drafters["eagle"].path.name == backend
        assert e.ctx.embeddings is (request.param == "eagle1")
        e.prepare(SpecConfig("eagle"))  # calibrates
        e.generate(random_prompt(1), max_tokens=2, spec=SpecConfig("eagle"))
        yield e


def test_no_tree_is_grown_for_a_while_after_none_paid(eagle_engine, target_path, monkeypatch):
    """Where verifying any node costs more than it brings, growing the tree is wasted: after
    such a round the next 1, 2, 4, ... rounds grow none (their rows wait and go through the
    draft in one batch), and the output stays plain greedy decoding."""
    eagle = eagle_engine.drafters["eagle"]
    monkeypatch.setattr(eagle, "nodes", 0)  # sized by cost
    monkeypatch.setattr(eagle, "_wait", 0)
    monkeypatch.setattr(eagle, "_backoff", 0)
    fix_costs(eagle.costs, 1.0 + 5.0 * np.arange(33), monkeypatch)  # a row costs 5 tokens
    grown, committed = [], []
    grow, commit = eagle._grow, eagle.path.commit
    monkeypatch.setattr(eagle, "_grow", lambda tokens, limit: grown.append(len(tokens)) or grow(tokens, limit))
    monkeypatch.setattr(eagle.path, "commit", lambda tok, g, pos: committed.append(len(pos)) or commit(tok, g, pos))
    prompt = random_prompt(71)
    ref = greedy_reference(target_path, prompt, 40)
    got = eagle_engine.generate(prompt, max_tokens=40, sampling=SamplingConfig(temperature=0),
                                spec=SpecConfig("eagle", draft_max=16))
    assert first_divergence(got.tokens, ref) is None and got.stats.draft_rounds == 0
    first = grown[0]
    assert np.diff(grown).tolist()[:4] == [2, 3, 5, 9] and len(grown) < 10  # waits of 1, 2, 4, 8
    assert committed[1:4] == [2, 3, 5]  # the waiting rows, each time in one batch
    assert first == len(prompt)  # round one grew a tree
    before, waiting = len(grown), eagle._wait
    again = eagle_engine.generate(prompt, max_tokens=min(waiting, 8), sampling=SamplingConfig(temperature=0),
                                  spec=SpecConfig("eagle", draft_max=16))
    assert waiting > 0 and len(grown) == before  # the next prompt goes on waiting
    assert again.tokens == got.tokens[:len(again.tokens)]


@pytest.mark.parametrize("seed", range(4))
def test_greedy_eagle_equals_plain_greedy_decoding(eagle_engine, target_path, seed):
    prompt = random_prompt(70 + seed)
    ref = greedy_reference(target_path, prompt, 40)
    got = eagle_engine.generate(prompt, max_tokens=40, sampling=SamplingConfig(temperature=0),
                                spec=SpecConfig("eagle", draft_max=16))
    assert first_divergence(got.tokens, ref) is None
    assert got.stats.draft_rounds >= 5 and len(got.stats.position_proposed) >= 2  # deep trees


def test_trees_are_best_first_and_sized_by_the_cost_curve(eagle_engine, monkeypatch):
    eagle = eagle_engine.drafters["eagle"]
    prompt = random_prompt(97)
    eagle_engine.generate(prompt, max_tokens=2, spec=SpecConfig("eagle"))
    monkeypatch.setattr(eagle, "nodes", 0)  # sized by cost
    monkeypatch.setattr(eagle, "draft_seconds", 0.0)
    monkeypatch.setattr(eagle, "_accepted", 100.0)  # as if the draft were very good
    monkeypatch.setattr(eagle, "_expected", 1.0)
    fix_costs(eagle.costs, [1.0] + [1.0001] * 32, monkeypatch)  # nearly free rows: a full tree
    tokens = list(eagle_engine.ctx.tokens) + [5]
    eagle.prepare(tokens)  # what the last decode computed is the history
    n, _ = eagle.plan(32, tokens)
    g = eagle._grown
    assert n == min(32, len(g.tokens)) and len(g.tokens) >= 16
    assert np.all(np.diff(g.chances) <= 1e-12)                      # best first
    assert np.all(g.parents < np.arange(len(g.parents)))            # parents first
    assert np.all(g.chances[g.parents[g.parents >= 0]] >= g.chances[g.parents >= 0])
    monkeypatch.setattr(eagle, "_accepted", 0.5)  # half of what the chances promise: no node
    fix_costs(eagle.costs, 1.0 + 0.9 * np.arange(33), monkeypatch)  # brings the 0.9 token a row costs
    eagle.prepare(tokens)
    assert eagle.plan(32, tokens)[0] == 0


def test_depth_steps_expand_only_nodes_inside_the_best_tree(eagle_engine, monkeypatch):
    """Where a third row costs more than any node can bring, the steps after the first
    expand at most the two nodes a tree can hold, and stop once no new node gets into it;
    for a tree of 32 nodes, top_k of them."""
    eagle = eagle_engine.drafters["eagle"]
    prompt = random_prompt(98)
    eagle_engine.generate(prompt, max_tokens=2, spec=SpecConfig("eagle"))
    monkeypatch.setattr(eagle, "nodes", 0)  # sized by cost
    monkeypatch.setattr(eagle, "_accepted", 1e4)  # every chance counts as (nearly) certain
    widths: list[int] = []
    expand = eagle.path.expand
    monkeypatch.setattr(eagle.path, "expand", lambda tok, *a: widths.append(len(tok)) or expand(tok, *a))
    tokens = list(eagle_engine.ctx.tokens) + [5]
    for curve, most in (([1.0] * 3 + [1e3] * 30, 2), ([1.0] + [1.0001] * 32, eagle.top_k)):
        fix_costs(eagle.costs, curve, monkeypatch)
        if most > 2:  # (sized by cost, a peaked random draft's rates can tie in floats)
            monkeypatch.setattr(eagle, "nodes", 32)
        widths.clear()
        eagle.prepare(tokens)
        n, _ = eagle.plan(32, tokens)
        if most == 2:
            assert 1 <= n <= 2 and max(widths) <= 2
        else:
            assert n == min(32, len(eagle._grown.tokens)) and widths[:2] == [most, most]


def test_deeper_steps_read_the_embedding_of_target_ids(eagle_engine, monkeypatch):
    """A node expanded by a depth step is fed as its target token id (the embedding is the
    target's), not as its row of the reduced draft vocabulary."""
    eagle = eagle_engine.drafters["eagle"]
    prompt = random_prompt(99)
    eagle_engine.generate(prompt, max_tokens=2, spec=SpecConfig("eagle"))
    fed: list[list[int]] = []
    expand = eagle.path.expand
    monkeypatch.setattr(eagle.path, "expand", lambda tok, *a: fed.append(np.asarray(tok).tolist()) or expand(tok, *a))
    tokens = list(eagle_engine.ctx.tokens) + [5]
    eagle.prepare(tokens)
    eagle.plan(32, tokens)
    ids = eagle.heads.target_ids(np.arange(eagle.heads.vocab_size))
    if np.array_equal(ids, np.arange(len(ids))):
        pytest.skip("this draft predicts the whole target vocabulary: its rows are target ids")
    assert fed and set(sum(fed, [])) <= set(ids.tolist())
    assert fed[0][0] == eagle._grown.tokens[0]  # the best node of all, expanded first


def test_auto_considers_eagle_and_stays_exact(eagle_engine, target_path, monkeypatch):
    fix_costs(eagle_engine.costs, np.full(33, eagle_engine.costs.t_verify(1)), monkeypatch)  # free rows
    monkeypatch.setattr(eagle_engine.drafters["eagle"], "_accepted", 1e4)  # as if very good
    prompt = random_prompt(90)
    ref = greedy_reference(target_path, prompt, 30)
    got = eagle_engine.generate(prompt, max_tokens=30, sampling=SamplingConfig(temperature=0),
                                spec=SpecConfig("auto"))
    assert first_divergence(got.tokens, ref) is None
    assert got.stats.controller["plans"].get("eagle", 0) > 0


def test_sampled_eagle_follows_the_target_distribution(eagle_engine, target_path):
    from test_engine import exact_first_two, sample_first_two
    prompt = random_prompt(91, 6)
    exact = exact_first_two(target_path, prompt, 0.9, 0)
    sampling = dict(temperature=0.9, top_k=0, top_p=1.0, min_p=0.0)
    # the prompt comes from the KV cache after the first run, so round one is plain (no
    # features yet) and round two verifies a tree for token two
    stats = sample_first_two(eagle_engine, prompt, 8_000, sampling, SpecConfig("eagle"), exact,
                             max_tokens=4)
    assert stats.draft_rounds >= 8_000


def test_eagle_needs_a_draft_and_a_good_file(target_path, tmp_path):
    with Engine(target_path, None, target_config=CFG) as eng:
        with pytest.raises(ValueError, match="eagle"):
            eng.generate(random_prompt(83), spec=SpecConfig("eagle"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 10)
    with pytest.raises(ModelFileError, match="truncated or corrupt") as e:
        Engine(target_path, None, target_config=CFG, eagle=bad)
    assert "\n" not in str(e.value)


def test_cli_runs_eagle_and_names_a_bad_file_in_one_line(target_path, eagle_path, tmp_path):
    import json

    from test_cli import TINY, assert_one_line_error, greedy_tokens, invoke
    got = invoke("run", "-m", target_path, "--no-draft", "--eagle", eagle_path, "--tree-nodes", 6,
                 *TINY, "--method", "eagle", "-t", 0, "-n", 12, "--json", "hello world")
    assert got.exit_code == 0, got.output
    data = json.loads(got.stdout)
    assert data["stats"]["method"] == "eagle" and data["stats"]["draft_tokens"] > 0
    assert data["tokens"] == greedy_tokens(target_path, [{"role": "user", "content": "hello world"}], 12)
    got = invoke("run", "-m", target_path, "--no-draft", *TINY, "--method", "eagle", "hello")
    assert_one_line_error(got, "pass an EAGLE-3 draft with --eagle")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 10)
    assert_one_line_error(invoke("run", "-m", target_path, "--no-draft", "--eagle", bad, *TINY, "hi"),
                          str(bad))


def test_auto_backend_takes_the_faster_path_and_numpy_without_the_graph(target_path, eagle_path, monkeypatch):
    from ggspec import backend
    from ggspec.errors import GgspecError
    from ggspec.heads import eagle_paths

    timed = {}

    def fake_step(path, width, history=1, repeats=3):  # llama.cpp's graph twice as fast
        timed[path.name] = width
        return {"numpy": 2e-3, "llama": 1e-3}[path.name]

    monkeypatch.setattr(eagle_paths, "step_seconds", fake_step)
    with Engine(target_path, None, target_config=CFG, eagle=eagle_path) as e:
        assert e.drafters["eagle"].path.name == "llama" and timed == {"numpy": 8, "llama": 8}
    monkeypatch.setattr(eagle_paths, "step_seconds", lambda path, *a, **k: {"numpy": 1e-3, "llama": 2e-3}[path.name])
    with Engine(target_path, None, target_config=CFG, eagle=eagle_path) as e:
        assert e.drafters["eagle"].path.name == "numpy"
    with pytest.raises(ValueError, match="must be one of auto, numpy, llama, got 'torch'"):
        Engine(target_path, None, target_config=CFG, eagle=eagle_path, eagle_backend="torch")
    monkeypatch.setattr(backend, "_get_embeddings_nextn", None)  # a llama.cpp without the staging API
    with Engine(target_path, None, target_config=CFG, eagle=eagle_path) as e:
        assert e.drafters["eagle"].path.name == "numpy"
    with pytest.raises(GgspecError, match="does not export llama_set_embeddings_nextn.*--eagle-backend numpy"):
        Engine(target_path, None, target_config=CFG, eagle=eagle_path, eagle_backend="llama")


def test_cli_eagle_backend_llama_is_exact(target_path, eagle_path):
    import json

    from test_cli import TINY, greedy_tokens, invoke
    got = invoke("run", "-m", target_path, "--no-draft", "--eagle", eagle_path, "--eagle-backend", "llama",
                 "--tree-nodes", 6, *TINY, "--method", "eagle", "-t", 0, "-n", 12, "--json", "hello world")
    assert got.exit_code == 0, got.output
    data = json.loads(got.stdout)
    assert data["stats"]["draft_tokens"] > 0
    assert data["tokens"] == greedy_tokens(target_path, [{"role": "user", "content": "hello world"}], 12)


def test_step_time_tool_prints_both_paths_against_a_target_decode(target_path, eagle_path):
    import re
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).parent.parent / "tools" / "eagle_step_time.py"
    got = subprocess.run([sys.executable, str(tool), "-m", target_path, "--eagle", str(eagle_path), "--depth", "40",
                          "--repeat", "2", "--threads", "1", "--allow-busy"], capture_output=True, text=True)
    assert got.returncode == 0, got.stderr
    assert re.search(r"target decode, 1 row after 40: +[\d.]+ ms", got.stdout)
    for name in ("numpy", "llama"):
        assert re.search(rf"eagle depth step, {name} +\(8 nodes\): +[\d.]+ ms = +[\d.]+% of a target decode "
                         r"\((within|over) the 10% budget\)", got.stdout), got.stdout


def test_both_paths_grow_the_same_tree(target_path, eagle_path):
    """The same history through numpy and through llama.cpp's eagle3 graph: the same
    EAGLE-2 tree (tokens, parents, best-first order), chances within 5%."""
    from contextlib import ExitStack

    from ggspec.drafters.eagle import DEPTH, EagleDrafter
    from ggspec.heads.eagle_paths import open_path

    with ExitStack() as stack:
        e = stack.enter_context(Engine(target_path, None, target_config=CFG, eagle=eagle_path,
                                       eagle_backend="numpy", tree_nodes=16))
        e.prepare(SpecConfig("eagle"))  # calibrates
        e.generate(random_prompt(5), max_tokens=3, spec=SpecConfig("eagle"))  # the history
        by_numpy = e.drafters["eagle"]
        llama = open_path("llama", by_numpy.heads, eagle_path, CFG, e.ctx, stack, by_numpy.top_k, DEPTH)
        by_llama = EagleDrafter(e.ctx, e.costs, llama, 32, 16)
        tokens = list(e.ctx.tokens) + [5]
        for d in (by_numpy, by_llama):
            d.prepare(tokens)  # the history: what the last decode computed
            assert d.plan(32, tokens)[0] == 16
        a, b = by_numpy._grown, by_llama._grown
    assert len(a.tokens) >= 16 and (a.parents >= 0).any()  # deeper than one step

    def by_path(g):  # node -> its tokens from the root: the order of near ties may differ
        paths = []
        for t, p in zip(g.tokens, g.parents):
            paths.append((*paths[p], int(t)) if p >= 0 else (int(t),))
        return dict(zip(paths, g.chances))

    pa, pb = by_path(a), by_path(b)
    clear = [p for p, c in pa.items() if c > 1.05 * a.chances.min()]  # not at the cut-off
    assert len(clear) >= 16 and all(p in pb for p in clear)
    np.testing.assert_allclose([pa[p] for p in clear], [pb[p] for p in clear], rtol=0.05)


def test_default_eagle_is_the_registry_s_shipped_file(target_path):
    """`eagle="default"` takes the file the registry ships for a registry target; for any
    other target it says that none is shipped."""
    from ggspec import hub

    shipped = hub.default_heads(hub.default_model(), "eagle")
    assert shipped is not None and shipped.is_file() and shipped.parent.name == "heads"
    with pytest.raises(ValueError, match="no EAGLE draft is shipped for .*target.gguf"):
        Engine(target_path, None, eagle="default")


def test_an_eagle_draft_given_as_the_target_or_the_draft_model_is_named_in_one_line(target_path, eagle_path):
    from test_cli import TINY, assert_one_line_error, invoke
    for args in (["-m", eagle_path], ["-m", target_path, "-d", eagle_path]):
        assert_one_line_error(invoke("run", *args, *TINY, "hello"), "holds an EAGLE-3 draft for a target model",
                              "--eagle FILE")
