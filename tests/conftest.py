"""Shared fixtures: tiny generated GGUF models (fast) and the real Qwen pair (marked `real`)."""

from __future__ import annotations

import signal

import pytest

from tinymodels import write_tiny_llama


def pytest_configure(config):
    # tests press Ctrl-C in the ggspec processes they start, as a person at a terminal
    # would; a test run started where SIGINT is ignored (a script's background job) would
    # pass that on to them, and the rpc server and the chat prompt would not hear it
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session", autouse=True)
def state_dir(tmp_path_factory):
    """Calibrations measured and estimates learnt by tests, in this process and in the
    ggspec processes tests start, go to files of their own, not the user's."""
    path = tmp_path_factory.mktemp("state")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GGSPEC_STATE", str(path))
        yield path


@pytest.fixture
def experience_store(state_dir):
    from ggspec import experience
    return state_dir / experience.FILE


@pytest.fixture(autouse=True)
def forget_experience(experience_store):
    """Each test's engines start from the built-in starting guesses: what one test's
    engines learnt is forgotten when it ends, and what engines shared by a module's tests
    stored when they closed (after the last test's own teardown) when the next test starts."""
    experience_store.unlink(missing_ok=True)
    yield
    experience_store.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def target_path(tiny_dir) -> str:
    return str(write_tiny_llama(tiny_dir / "target.gguf", seed=0))


@pytest.fixture(scope="session")
def draft_path(tiny_dir, target_path) -> str:
    """A draft that agrees with the target on most tokens (the target plus noise)."""
    return str(write_tiny_llama(tiny_dir / "draft.gguf", base=target_path, noise=0.1, seed=1))


@pytest.fixture(scope="session")
def other_path(tiny_dir) -> str:
    """A draft sharing the vocabulary but unrelated to the target: many rejections."""
    return str(write_tiny_llama(tiny_dir / "other.gguf", seed=7, n_layer=1))
