"""Saving and resuming sessions: a resumed engine or chat goes on exactly as one that never
stopped; files for other models, truncated, corrupted or of another version are refused
with one line and change nothing; saving is atomic."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ggspec import BackendConfig, BusyError, Engine, SamplingConfig, SessionFileError, SpecConfig, hub, session
from ggspec.chat import ChatSession, Settings
from ggspec.cli import cli
from ggspec.tokens import common_prefix
from test_eagle_engine import eagle_path  # noqa: F401  (a fixture)
from test_medusa import heads_path  # noqa: F401  (a fixture)
from tinymodels import write_tiny_recurrent

CFG = BackendConfig(n_ctx=1024, n_threads=1)
GREEDY = SamplingConfig(temperature=0)


def engine(target: str, draft: str | None, cfg: BackendConfig = CFG) -> Engine:
    return Engine(target, draft, target_config=cfg)


def state(eng: Engine) -> dict:
    """Everything a load may change, to compare before and after."""
    contexts = session._contexts(eng)
    return {"tokens": {role: list(ctx.tokens) for role, ctx in contexts.items()},
            "kv": {role: bytes(ctx.save_state()) for role, ctx in contexts.items()},
            "estimates": {name: part.state() for name, part in session.estimators(eng).items() if part},
            "rng": eng.rng.bit_generator.state}


def count_decoded(monkeypatch, ctx) -> list[int]:
    """Record how many tokens each eval() of `ctx` decodes (the real eval runs)."""
    counts: list[int] = []
    real = ctx.eval

    def counting(tokens, **kw):
        counts.append(len(tokens))
        return real(tokens, **kw)

    monkeypatch.setattr(ctx, "eval", counting)
    return counts


@pytest.mark.parametrize("sampling,method", [
    (GREEDY, "draft"), (SamplingConfig(seed=3), "draft"), (SamplingConfig(), "draft"),
    (GREEDY, "lookup"), (SamplingConfig(temperature=1.0, seed=5), "lookup"), (SamplingConfig(seed=2), "none"),
], ids=["greedy-draft", "seeded-draft", "unseeded-draft", "greedy-lookup", "seeded-lookup", "seeded-none"])
def test_a_resumed_chat_commits_what_one_that_never_stopped_does(target_path, draft_path, tmp_path, monkeypatch,
                                                                 sampling, method):
    # (drafting ahead would decode a timing-dependent number of speculative draft tokens)
    settings = Settings(sampling, SpecConfig(method, draft_max=4, async_draft=False), 24)
    file = tmp_path / "chat.ggs"
    with engine(target_path, draft_path) as a, engine(target_path, draft_path) as b:
        first = ChatSession(a, settings, system="be brief")
        first.ask("hello world")
        first.ask("the cat")
        first.save(file)
        decoded_a = count_decoded(monkeypatch, a.drafters["draft"].ctx)
        went_on = [first.ask("and the dog"), first.ask("more")]

        resumed = ChatSession(b, Settings(SamplingConfig(), SpecConfig("none"), 3))  # replaced by the file's
        resumed.load(file)
        assert resumed.settings == settings and resumed.system == "be brief" and len(resumed.messages) == 4
        decoded_b = count_decoded(monkeypatch, b.drafters["draft"].ctx)
        held = common_prefix(b.ctx.tokens, b.tokenize(resumed.conversation("and the dog")))
        after = [resumed.ask("and the dog"), resumed.ask("more")]

        assert [r.tokens for r in after] == [r.tokens for r in went_on]
        assert [r.text for r in after] == [r.text for r in went_on]
        # nothing it had cached is prefilled again, in the target or the draft model
        assert [(r.stats.cached_tokens, r.stats.prefill_tokens) for r in after] == \
               [(r.stats.cached_tokens, r.stats.prefill_tokens) for r in went_on]
        assert after[0].stats.cached_tokens == held > 0  # all the loaded cache shares with the prompt
        assert decoded_b == decoded_a
        assert resumed.total.generated_tokens == first.total.generated_tokens
        assert resumed.messages == first.messages


def test_an_engine_saved_and_loaded_goes_on_as_it_would_have(target_path, draft_path, tmp_path):
    sampling = SamplingConfig(temperature=0.9)  # unseeded: the engine's generator seeds it, and is saved
    spec = SpecConfig("draft", draft_max=3)
    file = tmp_path / "engine.ggs"
    with engine(target_path, draft_path) as a, engine(target_path, draft_path) as b:
        prompt = a.tokenize("hello world and the cat")
        first = a.generate(prompt, max_tokens=20, sampling=sampling, spec=spec)
        a.save(file)
        following = [*prompt, *first.tokens, *a.tokenize(" the dog")]
        went_on = a.generate(following, max_tokens=20, sampling=sampling, spec=spec)
        b.load(file)
        after = b.generate(following, max_tokens=20, sampling=sampling, spec=spec)
        assert after.tokens == went_on.tokens
        assert after.stats.cached_tokens == went_on.stats.cached_tokens == len(prompt) + len(first.tokens) - 1


DERIVED = {"_table"}  # caches computed again from the saved estimates when next used


def test_the_controllers_estimates_and_the_random_state_come_back(target_path, draft_path, tmp_path):
    file = tmp_path / "auto.ggs"
    with engine(target_path, draft_path) as a, engine(target_path, draft_path) as b:
        a.generate("hello world the cat the cat the cat", max_tokens=30, sampling=SamplingConfig(temperature=0.7),
                   spec=SpecConfig("auto", draft_max=4))
        assert a.costs.calibrated and state(a)["estimates"] != state(b)["estimates"]  # it learnt something
        auto_a, auto_b = a.drafters["auto"], b.drafters["auto"]
        learners = [(a.costs, b.costs), (auto_a.copy_acceptance, auto_b.copy_acceptance),
                    (auto_a.model_acceptance, auto_b.model_acceptance), (a.costs.overlap, b.costs.overlap)]
        for x, _ in learners:  # every attribute away from a fresh engine's, also those no test knows of
            for name, value in vars(x).items():
                if isinstance(value, np.ndarray):
                    value += 0.01
                elif isinstance(value, (int, float)):
                    setattr(x, name, value + 1)
        auto_a._streak += 7
        a.save(file)
        b.load(file)
        assert state(b) == state(a)
        for x, y in learners:
            assert vars(x).keys() == vars(y).keys()
            for name, value in vars(x).items():
                if name in DERIVED:
                    continue
                assert np.array_equal(value, vars(y)[name]), f"{type(x).__name__}.{name} was not restored"
        assert auto_b._streak == auto_a._streak


def test_saving_from_inside_a_generation_is_refused_not_a_deadlock(target_path, tmp_path):
    with engine(target_path, None) as eng:
        with pytest.raises(BusyError, match="this thread is generating"):
            eng.generate("hello", max_tokens=4, on_text=lambda piece: eng.save(tmp_path / "x.ggs"))
        assert not (tmp_path / "x.ggs").exists()
        assert eng.generate("hello", max_tokens=4).tokens  # the engine is free again


@pytest.mark.parametrize("kind,fixture,nodes,refusal", [
    ("medusa", "heads_path", 6, r"saved with Medusa heads; load it with the same \(--heads FILE\)"),
    ("eagle", "eagle_path", 16, r"saved with an EAGLE-3 draft; load it with the same \(--eagle FILE\)"),
])
def test_head_drafters_estimates_come_back_and_need_their_file(request, target_path, tmp_path, kind, fixture,
                                                               nodes, refusal):
    file = tmp_path / f"{kind}.ggs"
    cfg = BackendConfig(n_ctx=512, n_batch=64, n_threads=1)
    spec = SpecConfig(kind, draft_max=nodes)
    heads = {"heads" if kind == "medusa" else kind: request.getfixturevalue(fixture)}
    with Engine(target_path, None, target_config=cfg, tree_nodes=nodes, **heads) as a, \
            Engine(target_path, None, target_config=cfg, tree_nodes=nodes, **heads) as b:
        prompt = a.tokenize("hello world the cat the cat")
        first = a.generate(prompt, max_tokens=24, sampling=GREEDY, spec=spec)
        assert first.stats.draft_tokens  # it drafted trees, and learnt from them
        a.save(file)
        b.load(file)
        assert state(b) == state(a)
        following = [*prompt, *first.tokens, *a.tokenize(" the dog")]
        assert b.generate(following, max_tokens=16, sampling=GREEDY, spec=spec).tokens == \
            a.generate(following, max_tokens=16, sampling=GREEDY, spec=spec).tokens
    with Engine(target_path, None, target_config=cfg) as plain:
        before = state(plain)
        with pytest.raises(SessionFileError, match=refusal):
            plain.load(file)
        assert state(plain) == before


@pytest.mark.parametrize("arch", ["mamba", "lfm2"])
def test_a_recurrent_target_and_draft_resume_exactly(tiny_dir, tmp_path, arch):
    target = str(write_tiny_recurrent(tiny_dir / f"session-{arch}.gguf", arch))
    draft = str(write_tiny_recurrent(tiny_dir / f"session-{arch}-draft.gguf", arch, noise=0.15))
    settings = Settings(SamplingConfig(seed=9), SpecConfig("draft", draft_max=3), 16)
    file = tmp_path / "recurrent.ggs"
    with engine(target, draft) as a, engine(target, draft) as b:
        first = ChatSession(a, settings)
        first.ask("hello world")
        first.save(file)
        went_on = first.ask("the cat")
        resumed = ChatSession(b, settings)
        resumed.load(file)
        after = resumed.ask("the cat")
        assert after.tokens == went_on.tokens
        assert after.stats.cached_tokens == went_on.stats.cached_tokens > 0


@pytest.fixture
def saved(target_path, draft_path, tmp_path) -> Path:
    """A chat of two turns saved by a session on the tiny pair."""
    file = tmp_path / "saved.ggs"
    with engine(target_path, draft_path) as eng:
        chat = ChatSession(eng, Settings(GREEDY, SpecConfig("draft", draft_max=4), 12))
        chat.ask("hello world")
        chat.ask("the cat")
        chat.save(file)
    return file


@pytest.fixture
def live(target_path, draft_path):
    """A chat in progress, on the same models as `saved` but another conversation."""
    with engine(target_path, draft_path) as eng:
        chat = ChatSession(eng, Settings(SamplingConfig(seed=1), SpecConfig("draft", draft_max=2), 10))
        chat.ask("the dog")
        yield chat


def refused(chat: ChatSession, file: Path, match: str) -> None:
    """Loading `file` into `chat` raises one line matching `match`, and changes nothing."""
    before, messages, settings = state(chat.engine), list(chat.messages), chat.settings
    with pytest.raises(SessionFileError, match=match) as e:
        chat.load(file)
    assert "\n" not in str(e.value)
    assert state(chat.engine) == before and chat.messages == messages and chat.settings == settings


def test_a_file_made_for_another_target_is_refused(saved, other_path, draft_path):
    with engine(other_path, draft_path) as eng:
        chat = ChatSession(eng, Settings(GREEDY, SpecConfig("draft"), 8))
        chat.ask("hello")
        refused(chat, saved, r"saved with the target model target.gguf \(sha256 \w{12}\), not other.gguf .*"
                             r"load it with that model \(-m .*target.gguf\)")


def test_a_file_made_with_another_draft_or_none_is_refused(saved, target_path, draft_path, other_path, tmp_path):
    with engine(target_path, other_path) as eng:
        refused(ChatSession(eng, Settings(GREEDY, SpecConfig("draft"), 8)), saved,
                "saved with the draft model draft.gguf .* not other.gguf")
    with engine(target_path, None) as eng:
        refused(ChatSession(eng, Settings(GREEDY, SpecConfig("none"), 8)), saved,
                r"saved with the draft model draft.gguf; load it with that model \(-d .*draft.gguf\)")
        solo = tmp_path / "solo.ggs"
        eng.save(solo)
    with engine(target_path, draft_path) as eng:
        refused(ChatSession(eng, Settings(GREEDY, SpecConfig("draft"), 8)), solo,
                r"saved without a draft model; load it without one \(--no-draft\)")


def test_a_file_made_with_another_context_size_is_refused(saved, target_path, draft_path):
    with engine(target_path, draft_path, BackendConfig(n_ctx=512, n_threads=1)) as eng:
        refused(ChatSession(eng, Settings(GREEDY, SpecConfig("draft"), 8)), saved,
                "saved with a context of 1024 tokens for the target, this one has 512; load it with --ctx-size 1024")


def test_an_engine_file_is_not_a_chat(live, target_path, tmp_path):
    file = tmp_path / "engine.ggs"
    live.engine.save(file)
    refused(live, file, r"holds no chat \(it was saved with Engine.save\); load it with Engine.load")


@pytest.mark.parametrize("keep", [0, 5, 20, 200, -1000, -33, -1])
def test_a_truncated_file_is_refused(saved, live, tmp_path, keep):
    data = saved.read_bytes()
    cut = tmp_path / "cut.ggs"
    cut.write_bytes(data[:keep])
    refused(live, cut, r"is truncated \(.*bytes\).*save the session again")


@pytest.mark.parametrize("where", [30, 100, 0.5, -40, -1])  # header, header, a KV cache, checksum
def test_a_flipped_byte_is_refused(saved, live, tmp_path, where):
    data = bytearray(saved.read_bytes())
    i = int(len(data) * where) if isinstance(where, float) else where
    data[i] ^= 0x10
    bad = tmp_path / "bad.ggs"
    bad.write_bytes(data)
    refused(live, bad, r"is corrupted \(its checksum does not match its contents\); save the session again")


def test_a_file_with_bytes_after_its_end_is_refused(saved, live, tmp_path):
    longer = tmp_path / "longer.ggs"
    longer.write_bytes(saved.read_bytes() + b"\0")
    refused(live, longer, "is corrupted")


def test_another_format_version_or_another_kind_of_file_is_refused(saved, live, tmp_path, target_path):
    data = bytearray(saved.read_bytes())
    data[8:12] = (session.FORMAT_VERSION + 1).to_bytes(4, "little")
    newer = tmp_path / "newer.ggs"
    newer.write_bytes(data)
    refused(live, newer, f"is in session format version {session.FORMAT_VERSION + 1}; this ggspec .* reads "
                         f"version {session.FORMAT_VERSION}: load it with the ggspec that saved it")
    refused(live, Path(target_path), "is not a ggspec session file")
    refused(live, tmp_path / "missing.ggs", "no session file .*missing.ggs")


def rewrite(src: Path, dst: Path, change) -> None:
    """Copy a session file, letting change(header, blobs) edit its header (a dict) and
    blobs (a bytearray), with a valid checksum: a file that only llama.cpp or the value
    checks can refuse."""
    data = src.read_bytes()
    _, version, n_header, n_blobs = session.PREFIX.unpack_from(data)
    start = session.PREFIX.size + n_header
    header = json.loads(data[session.PREFIX.size:start])
    blobs = bytearray(data[start:start + n_blobs])
    change(header, blobs)
    text = json.dumps(header).encode()
    session.write_atomic(dst, [session.PREFIX.pack(session.MAGIC, version, len(text), len(blobs)), text, blobs])


@pytest.mark.parametrize("role", ["target", "draft"])
def test_a_cache_llama_cpp_refuses_leaves_the_session_going_on_unchanged(saved, target_path, draft_path, tmp_path,
                                                                         role):
    def break_cache(header, blobs):
        entry = header["caches"][role]
        blobs[entry["offset"] + 8:entry["offset"] + 12] = (99).to_bytes(4, "little")  # its stream count

    bad = tmp_path / "bad.ggs"
    rewrite(saved, bad, break_cache)
    settings = Settings(SamplingConfig(seed=4), SpecConfig("draft", draft_max=3), 10)
    with engine(target_path, draft_path) as a, engine(target_path, draft_path) as b:
        twin, chat = ChatSession(a, settings), ChatSession(b, settings)
        twin.ask("the dog")
        chat.ask("the dog")
        refused(chat, bad, f"llama.cpp refused the saved KV cache of {role}.gguf .*the session is unchanged")
        # the caches it had replaced are back: the chat goes on as its twin does
        assert chat.ask("and more").tokens == twin.ask("and more").tokens


def test_estimates_that_do_not_fit_are_refused(saved, live, tmp_path):
    def break_estimates(header, blobs):
        header["controller"]["auto"]["copy_acceptance"]["p"] = [[0.5]]

    bad = tmp_path / "bad.ggs"
    rewrite(saved, bad, break_estimates)
    refused(live, bad, "holds a session this engine cannot take .*shape")


def test_saving_is_atomic(saved, live, monkeypatch):
    old = saved.read_bytes()

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(SessionFileError, match="could not save the session to .*saved.ggs: No space left on device; "
                                               "a file that was there is unchanged"):
        live.save(saved)
    assert saved.read_bytes() == old
    assert os.listdir(saved.parent) == [saved.name]  # no temporary file left


def test_a_write_that_fails_midway_leaves_the_old_file(saved):
    old = saved.read_bytes()

    def parts():
        yield b"GGSPECSS" + b"\0" * 1000
        raise KeyboardInterrupt  # the process stops mid-write

    with pytest.raises(KeyboardInterrupt):
        session.write_atomic(saved, parts())
    assert saved.read_bytes() == old
    assert os.listdir(saved.parent) == [saved.name]


def test_a_model_is_hashed_once_per_size_and_mtime(target_path, monkeypatch):
    hashed: list[str] = []
    real = hub.hashlib.file_digest

    def counting(f, name):
        hashed.append(f.name)
        return real(f, name)

    monkeypatch.setattr(hub, "_SHA256", {})
    monkeypatch.setattr(hub.hashlib, "file_digest", counting)
    first = hub.file_sha256(target_path)
    assert hub.file_sha256(target_path) == first and len(hashed) == 1
    st = os.stat(target_path)
    os.utime(target_path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert hub.file_sha256(target_path) == first and len(hashed) == 2


def test_a_pulled_model_takes_the_registry_checksum_from_its_verification_record(tmp_path, monkeypatch):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + b"\0" * 60)
    hub._record_verified(model, "ab" * 32)  # what pull writes once the registry's sha256 matched
    monkeypatch.setattr(hub.hashlib, "file_digest", None)  # never hashed
    assert hub.file_sha256(model) == "ab" * 32


# --- through the command line --------------------------------------------------------------

def chat_cli(target: str, draft: str, script: str, *args: str):
    got = CliRunner().invoke(cli, ["chat", "-m", target, "-d", draft, "--threads", "1", "-c", "1024",
                                   "--method", "draft", "-k", "3", *args], input=script)
    return got


@pytest.mark.parametrize("sampling", [["-t", "0"], ["-s", "7"]], ids=["greedy", "seeded"])
def test_chat_save_then_resume_answers_as_if_it_never_stopped(target_path, draft_path, tmp_path, sampling):
    file = tmp_path / "c.ggs"
    whole = chat_cli(target_path, draft_path, "hello world\nthe cat\nand the dog\n", "-n", "10", *sampling)
    assert whole.exit_code == 0, whole.output
    saving = chat_cli(target_path, draft_path, f"hello world\nthe cat\n/save {file}\n", "-n", "10", *sampling)
    assert saving.exit_code == 0, saving.output
    assert f"saved to {file}: 2 turns" in saving.stderr and file.exists()
    # settings come from the file: -n 99 and no seed here would change the answer
    resumed = chat_cli(target_path, draft_path, "and the dog\n", "--resume", str(file))
    assert resumed.exit_code == 0, resumed.output
    assert f"resumed {file}: 2 turns" in resumed.stderr
    assert resumed.stdout.splitlines() == whole.stdout.splitlines()[2:]
    loaded = chat_cli(target_path, draft_path, f"the bird\n/load {file}\nand the dog\n")
    assert loaded.exit_code == 0, loaded.output
    assert f"loaded {file}: 2 turns" in loaded.stderr
    assert loaded.stdout.splitlines()[1:] == whole.stdout.splitlines()[2:]


def test_options_given_with_resume_replace_the_saved_ones(target_path, draft_path, tmp_path):
    file = tmp_path / "c.ggs"
    assert chat_cli(target_path, draft_path, f"hello world\n/save {file}\n", "-n", "10", "-t", "0").exit_code == 0
    got = chat_cli(target_path, draft_path, "/set\n", "--resume", str(file), "-n", "5", "--top-k", "3", "--ignore-eos")
    assert got.exit_code == 0, got.output
    assert "temperature 0.0, top_k 3," in got.stderr and "max_tokens 5" in got.stderr
    assert "ignore_eos True" in got.stderr


def test_draft_p_min_given_with_resume_applies_to_the_saved_method(target_path, draft_path, tmp_path):
    file = tmp_path / "c.ggs"
    assert chat_cli(target_path, draft_path, f"hello world\n/save {file}\n", "-n", "4", "-t", "0").exit_code == 0
    base = ["chat", "-m", target_path, "-d", draft_path, "--threads", "1", "-c", "1024", "--resume", str(file)]
    got = CliRunner().invoke(cli, [*base, "--draft-p-min", "0.5"], input="/set\n")  # the saved method: draft
    assert got.exit_code == 0, got.output
    assert "method draft, draft_max 3, draft_p_min 0.5," in got.stderr
    got = CliRunner().invoke(cli, [*base, "--method", "auto", "--draft-p-min", "0.5"], input="/set\n")
    assert got.exit_code == 1 and got.stderr.count("\n") == 1
    assert got.stderr.startswith("Error: --draft-p-min applies to the draft model's rounds")
    assert "method auto" in got.stderr


def test_resume_with_a_bad_file_is_one_error_line(target_path, draft_path, tmp_path, other_path):
    file = tmp_path / "c.ggs"
    assert chat_cli(target_path, draft_path, f"hello world\n/save {file}\n", "-n", "4").exit_code == 0
    file.write_bytes(file.read_bytes()[:-10])
    got = chat_cli(target_path, draft_path, "hi\n", "--resume", str(file))
    assert got.exit_code == 1 and got.stderr.count("\n") == 1
    assert got.stderr.startswith(f"Error: {file} is truncated")
    got = chat_cli(target_path, draft_path, "/load\n")
    assert got.exit_code == 1 and "usage: /load FILE" in got.stderr


@pytest.mark.real
def test_real_pair_resumes_exactly_and_prefills_nothing_cached(tmp_path):
    file = tmp_path / "real.ggs"
    with Engine(str(hub.pull("qwen2.5-coder-1.5b")), str(hub.pull("qwen2.5-coder-0.5b")),
                target_config=BackendConfig(n_ctx=1024)) as eng:
        for sampling in (GREEDY, SamplingConfig(seed=11)):
            chat = ChatSession(eng, Settings(sampling, SpecConfig("draft", draft_max=4), 16))
            first_prompt = eng.tokenize(chat.conversation("Name one sorting algorithm."))
            chat.ask("Name one sorting algorithm.")
            chat.save(file)
            went_on = chat.ask("And another one?")
            chat.load(file)  # back to where it was saved
            after = chat.ask("And another one?")
            assert after.tokens == went_on.tokens
            assert after.stats.cached_tokens == went_on.stats.cached_tokens > len(first_prompt)
            assert after.stats.prefill_tokens == went_on.stats.prefill_tokens


def test_async_draft_given_with_resume_applies_to_the_saved_method_and_replaces_it(target_path, draft_path, tmp_path):
    """Switches that /set does not take: --async-draft / --no-async-draft apply to the saved
    method (draft here), and replace what was saved."""
    file = tmp_path / "c.ggs"
    saved = chat_cli(target_path, draft_path, f"hello world\n/save {file}\n", "-n", "8", "-t", "0", "--async-draft")
    assert saved.exit_code == 0, saved.output
    base = ["chat", "-m", target_path, "-d", draft_path, "--threads", "1", "-c", "1024", "--resume", str(file)]
    for switch, ahead in (("--no-async-draft", False), ("--async-draft", True)):
        got = CliRunner().invoke(cli, [*base, switch], input="and the cat\n/stats\n/save " + str(file) + "\n")
        assert got.exit_code == 0, got.output
        assert ("drafted ahead" in got.stderr.split("session")[0]) == ahead  # the last answer's stats
    got = CliRunner().invoke(cli, [*base, "--method", "auto", "--async-draft"], input="/set\n")
    assert got.exit_code == 1 and got.stderr.startswith("Error: --async-draft applies to the draft model's rounds")
