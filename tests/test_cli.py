"""The command line through click's CliRunner: `run`, errors, `info`, `models`, `pull`.

Tiny generated models for everything but the one test marked `real`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ggspec import BackendConfig, Engine, SamplingConfig, SpecConfig, hub
from ggspec.cli import cli
from ggspec.config import DRAFT_P_MIN
from ggspec.stats import Stats, footer
from tinymodels import VOCAB, write_mismatched_vocab_llama, write_tiny_llama

REPO = Path(__file__).resolve().parents[1]
TINY = ["--threads", "1", "-c", "512"]
GREEDY = SamplingConfig(temperature=0)
STATS_FIELDS = {"prefill_tokens", "prefill_seconds", "generated_tokens", "rounds", "draft_tokens",
                "accepted_tokens", "acceptance_rate", "mean_accepted_length", "decode_seconds",
                "decode_tokens_per_second", "position_acceptance", "cached_tokens", "method"}


def invoke(*args, input: str | None = None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


def assert_one_line_error(result, *fragments: str) -> None:
    """A user mistake: exit code != 0, no traceback, exactly one `Error:` line."""
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0]


def greedy_tokens(target: str, prompt, n: int) -> list[int]:
    """Plain greedy decoding through the API, for comparison."""
    with Engine(target, None, target_config=BackendConfig(n_ctx=512, n_threads=1)) as engine:
        return engine.generate(prompt, max_tokens=n, sampling=GREEDY, spec=SpecConfig("none")).tokens


@pytest.fixture(scope="module")
def mismatched(tmp_path_factory) -> str:
    return str(write_mismatched_vocab_llama(tmp_path_factory.mktemp("mismatch") / "mismatch.gguf"))


def test_run_json_has_every_field_and_the_lossless_greedy_answer(target_path, draft_path):
    got = invoke("run", "-m", target_path, "-d", draft_path, *TINY, "--method", "draft", "-k", 3,
                 "-t", 0, "-n", 12, "--json", "hello world")
    assert got.exit_code == 0, got.output
    data = json.loads(got.stdout)
    assert set(data) == {"text", "tokens", "finish_reason", "stats", "target", "draft", "method", "params"}
    assert data["tokens"] == greedy_tokens(target_path, [{"role": "user", "content": "hello world"}], 12)
    assert data["finish_reason"] == "length"  # tiny models never end by themselves
    assert (data["target"], data["draft"], data["method"]) == (target_path, draft_path, "draft")
    stats = data["stats"]
    assert STATS_FIELDS <= set(stats)
    assert stats["generated_tokens"] == 12 and stats["method"] == "draft"
    assert stats["draft_tokens"] > 0 and 0 <= stats["acceptance_rate"] <= 1
    assert stats["prefill_tokens"] > 0 and stats["cached_tokens"] == 0
    assert data["params"]["temperature"] == 0 and data["params"]["draft_max"] == 3
    assert data["params"]["max_tokens"] == 12 and data["params"]["chat"] is True


def test_run_json_of_auto_carries_its_choices_not_the_engines_estimates(target_path, draft_path):
    """The acceptance tables are the engine's state (tens of kB): an answer's stats carry
    its plans and the costs they read."""
    got = invoke("run", "-m", target_path, "-d", draft_path, *TINY, "-t", 0, "-n", 12, "--json", "hello world")
    controller = json.loads(got.stdout)["stats"]["controller"]
    assert set(controller) == {"plans", "verify_ms", "draft_token_ms", "state_copy_ms"}
    assert sum(controller["plans"].values()) > 0


def test_the_footer_counts_one_token_in_the_singular():
    assert footer(Stats(method="none", generated_tokens=1, decode_seconds=0.5)) == "1 token, 2.0 tok/s, none"
    assert footer(Stats(method="none", generated_tokens=2, decode_seconds=0.5)) == "2 tokens, 4.0 tok/s, none"


def test_run_streams_the_text_to_stdout_and_the_footer_to_stderr(target_path, draft_path):
    got = invoke("run", "-m", target_path, "-d", draft_path, *TINY, "-t", 0, "-n", 10, "--json", "hi")
    text = json.loads(got.stdout)["text"]
    got = invoke("run", "-m", target_path, "-d", draft_path, *TINY, "-t", 0, "-n", 10, "hi")
    assert got.exit_code == 0
    assert got.stdout == text + "\n"
    footer = got.stderr.splitlines()[-1]  # (after a calibration's progress line, if one ran)
    assert footer.startswith("10 tokens, ") and "tok/s" in footer


def test_run_ignore_eos_goes_on_past_the_end_of_generation_token(tmp_path, target_path):
    prompt = "the cat and the dog"
    stopper = greedy_tokens(target_path, prompt, 8)[2]
    eog = str(write_tiny_llama(tmp_path / "eog.gguf", seed=0, eog_after=[stopper]))
    base = ["run", "-m", eog, *TINY, "--raw", "-t", 0, "-n", 12, "--json", prompt]
    ended, went_on = (json.loads(invoke(*base, *extra).stdout) for extra in ([], ["--ignore-eos"]))
    assert ended["finish_reason"] == "stop" and len(ended["tokens"]) < 12
    assert went_on["finish_reason"] == "length" and len(went_on["tokens"]) == 12
    assert went_on["tokens"][:len(ended["tokens"])] == ended["tokens"]
    assert (ended["params"]["ignore_eos"], went_on["params"]["ignore_eos"]) == (False, True)


def test_raw_prompt_from_argument_file_and_stdin_give_the_same_answer(tmp_path, target_path):
    prompt = "the cat and the dog"
    expected = greedy_tokens(target_path, prompt, 8)
    path = tmp_path / "prompt.txt"
    path.write_text(prompt)
    base = ["run", "-m", target_path, *TINY, "--raw", "-t", 0, "-n", 8, "--json"]
    for extra, stdin in [([prompt], None), (["-f", path], None), (["-"], prompt), ([], prompt)]:
        got = invoke(*base, *extra, input=stdin)
        assert got.exit_code == 0, got.output
        assert json.loads(got.stdout)["tokens"] == expected, extra


def test_stop_string_and_system_message(target_path):
    base = ["run", "-m", target_path, *TINY, "-t", 0, "-n", 20, "--json"]
    full = json.loads(invoke(*base, "hello").stdout)["text"]
    stop = full[5:8]
    got = json.loads(invoke(*base, "--stop", stop, "hello").stdout)
    assert got["finish_reason"] == "stop" and got["text"] == full[:full.index(stop)]
    with_system = json.loads(invoke(*base, "--system", "be brief", "hello").stdout)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    assert with_system["tokens"] == greedy_tokens(target_path, messages, 20)


@pytest.mark.parametrize("case", ["missing file", "incompatible draft", "bad option", "bad value",
                                  "unknown model", "draft method without draft", "empty prompt",
                                  "p-min of another method", "context below a verification batch",
                                  "typical without trees", "tree shape without heads", "tree size without heads",
                                  "eagle backend without eagle", "draft length out of range"])
def test_user_mistakes_give_one_line_and_a_failing_exit_code(case, tmp_path, target_path, mismatched):
    args, fragments = {
        "missing file": (["-m", tmp_path / "nope.gguf"], ["nope.gguf", "does not exist"]),
        "incompatible draft": (["-m", target_path, "-d", mismatched], ["do not share a tokenizer", "token"]),
        "bad option": (["-m", target_path, "--method", "magic"], ["--method", "magic"]),
        "bad value": (["-m", target_path, "--top-p", "0"], ["top_p"]),
        "unknown model": (["-m", "no-such-model"], ["unknown model 'no-such-model'", "known models"]),
        "draft method without draft": (["-m", target_path, "--method", "draft"], ["draft", "-d/--draft"]),
        "empty prompt": (["-m", target_path, "-f", os.devnull], ["empty"]),
        "p-min of another method": (["-m", target_path, "--draft-p-min", "0.5"], ["--draft-p-min", "--method draft"]),
        "context below a verification batch": (["-m", target_path, "-c", "16", "-k", "16"], ["-c/--ctx-size >= 17", "-k"]),
        "typical without trees": (["-m", target_path, "--typical"], ["--typical", "not to method auto", "--method medusa"]),
        "tree shape without heads": (["-m", target_path, "--tree", "chain"], ["--tree", "Medusa", "--heads"]),
        "tree size without heads": (["-m", target_path, "--tree-nodes", "4"], ["--tree-nodes", "--heads or --eagle"]),
        "eagle backend without eagle": (["-m", target_path, "--eagle-backend", "numpy"], ["--eagle-backend", "--eagle"]),
        "draft length out of range": (["-m", target_path, "-k", "0"], ["'-k' / '--draft-max'", "1<=x<=64"]),
    }[case]
    prompt = [] if case == "empty prompt" else ["hello"]
    assert_one_line_error(invoke("run", *TINY, *args, *prompt), *fragments)


@pytest.mark.parametrize("where", ["file", "stdin", "argument"])
def test_a_prompt_that_is_not_utf8_is_refused_before_any_model_loads(where, tmp_path, monkeypatch):
    """Bytes that are not UTF-8 (Latin-1 text, say) name where they came from; the model
    does not exist, so a refusal after loading would say that instead."""
    data = b"caf\xe9 au lait"
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(data)
    prompt = data.decode("utf-8", "surrogateescape")  # (what Python makes of such an argument)
    args, stdin, fragment = {"file": (["-f", bad], None, f"the prompt file {bad}"),
                             "stdin": (["-"], data, "the prompt on stdin"),
                             "argument": ([prompt], None, "the prompt")}[where]
    got = CliRunner().invoke(cli, ["run", "-m", str(tmp_path / "none.gguf"), *map(str, args)], input=stdin)
    assert_one_line_error(got, fragment, "is not UTF-8 text: byte 0xe9 at character 3")


def test_a_prompt_longer_than_the_context_is_one_line(target_path):
    got = invoke("run", "-m", target_path, "--threads", 1, "-c", 256, "--raw", "hello " * 400)
    assert_one_line_error(got, "context", "--ctx-size")


def test_info_summarises_a_gguf_file(target_path):
    got = invoke("info", target_path)
    assert got.exit_code == 0, got.output
    lines = dict(line.split(None, 1) for line in got.stdout.replace("chat template", "chat_template").splitlines())
    assert lines["architecture"] == "llama"
    assert lines["quantization"] == "F32"
    assert lines["vocabulary"].startswith(f"{VOCAB.n_vocab} tokens (llama tokenizer)")
    assert lines["context"].startswith("512 tokens")
    assert lines["chat_template"] == "yes"
    data = json.loads(invoke("info", target_path, "--json").stdout)
    assert data["parameters"] > 0 and data["layers"] == 2 and data["embedding_size"] == 64


def test_info_says_whether_a_draft_is_compatible_and_why_not(target_path, draft_path, mismatched):
    ok = invoke("info", target_path, "--draft", draft_path)
    assert ok.exit_code == 0
    assert ok.stdout.splitlines()[-1].split() == ["compatible", "yes:", "same", "tokenizer", "(llama,",
                                                   str(VOCAB.n_vocab), "tokens)"]
    bad = invoke("info", target_path, "--draft", mismatched, "--json")
    assert bad.exit_code == 1
    data = json.loads(bad.stdout)
    assert data["compatible"] is False and f"token {VOCAB.token_to_id['▁world']}" in data["reason"]


def test_info_on_a_missing_file_or_unpulled_model_is_one_line(tmp_path, monkeypatch):
    assert_one_line_error(invoke("info", tmp_path / "gone.gguf"), "gone.gguf", "does not exist")
    for command in (["info", tmp_path], ["run", "-m", tmp_path, "hi"]):  # a folder: the same words from both
        assert_one_line_error(invoke(*command), f"model file {tmp_path} is not a file")
    assert_one_line_error(invoke("info", "no-such-model"), "unknown model 'no-such-model'", "known models")
    monkeypatch.setenv("GGSPEC_CACHE", str(tmp_path))
    name = hub.default_model()
    assert_one_line_error(invoke("info", name), f"ggspec pull {name}")


def test_models_lists_the_registry_and_what_is_pulled(tmp_path, monkeypatch):
    monkeypatch.setenv("GGSPEC_CACHE", str(tmp_path))
    got = invoke("models")
    assert got.exit_code == 0
    for name, entry in hub.registry().items():
        line = next(line for line in got.stdout.splitlines() if line.startswith(name))
        assert f"no (ggspec pull {name})" in line
        assert (entry.draft or "-") in line
    assert str(tmp_path) in got.stdout
    data = json.loads(invoke("models", "--json").stdout)
    assert {m["name"] for m in data["models"]} == set(hub.registry())
    assert all(m["path"] is None for m in data["models"])


def test_pull_of_an_unknown_model_is_one_line():
    assert_one_line_error(invoke("pull", "no-such-model"), "unknown model", "known models")


def test_version_and_help_with_examples_through_python_m_ggspec():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    got = subprocess.run([sys.executable, "-m", "ggspec", "--help"], capture_output=True, text=True, env=env)
    assert got.returncode == 0
    assert "Examples:" in got.stdout
    for verb in ("chat", "run", "bench", "pull", "models", "info"):
        assert f"  {verb} " in got.stdout
    assert invoke("--version").stdout.startswith("ggspec, version ")


def test_method_draft_stops_at_llama_cpps_p_min_unless_told(target_path, draft_path):
    """On the command line method draft stops before a token the draft is unsure of
    (DRAFT_P_MIN, as llama.cpp's draft-simple); --draft-p-min 0 drafts K tokens every round."""
    base = ["run", "-m", target_path, "-d", draft_path, *TINY, "--method", "draft", "-k", 4, "-t", 0, "-n", 30,
            "--json", "hello world"]
    default, fixed = (json.loads(invoke(*base, *extra).stdout) for extra in ([], ["--draft-p-min", 0]))
    assert default["params"]["draft_p_min"] == DRAFT_P_MIN and fixed["params"]["draft_p_min"] == 0
    assert default["tokens"] == fixed["tokens"]
    rounds = fixed["stats"]["draft_rounds"]
    assert fixed["stats"]["draft_tokens"] >= 4 * (rounds - 1) and rounds > 3  # (the last round's budget may be less)
    assert default["stats"]["draft_tokens"] < fixed["stats"]["draft_tokens"]


@pytest.mark.real
def test_real_pair_run_json_greedy_draft_equals_plain_decoding():
    target = str(hub.pull("qwen2.5-coder-1.5b"))
    draft = str(hub.pull("qwen2.5-coder-0.5b"))
    base = ["run", "-m", target, "-d", draft, "-c", 1024, "-t", 0, "-n", 16, "--json",
            "Write a Python function that returns the square of a number."]
    spec = json.loads(invoke(*base, "--method", "draft", "-k", 4).stdout)
    plain = json.loads(invoke(*base, "--method", "none").stdout)
    assert spec["tokens"] == plain["tokens"] and len(spec["tokens"]) == 16
    assert "def" in spec["text"]
    assert spec["stats"]["draft_tokens"] > 0 and spec["stats"]["accepted_tokens"] > 0


def test_a_small_context_needs_a_verification_batch_only_for_methods_that_draft(target_path):
    base = ["run", "-m", target_path, "--threads", 1, "-c", 16, "--raw", "-t", 0, "-n", 2]
    for method, k in (("none", 16), ("lookup", 8)):
        got = invoke(*base, "--method", method, "-k", k, "hello world")
        assert got.exit_code == 0, got.output
    assert_one_line_error(invoke(*base, "--method", "lookup", "-k", 16, "hello world"), "-c/--ctx-size >= 17")


def test_a_context_size_rounded_up_by_llama_cpp_is_said_on_stderr(target_path):
    got = invoke("run", "-m", target_path, "--threads", 1, "-c", 300, "--raw", "-t", 0, "-n", 2, "hello world")
    assert got.exit_code == 0, got.output
    assert "rounded the context size up from 300 to 512 tokens" in got.stderr
    assert "rounded" not in got.stdout
    plain = invoke("run", "-m", target_path, *TINY, "--raw", "-t", 0, "-n", 2, "hello world")
    assert "rounded" not in plain.stderr
