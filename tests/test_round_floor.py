"""tools/round_floor.py: its bare decodes read the rows a real round reads (tiny models),
and it measures nothing on a busy machine."""

from __future__ import annotations

import numpy as np
import pytest

from ggspec import BackendConfig, hub, machine
from ggspec.backend import Context, Model
from toolfiles import load_tool

round_floor = load_tool("round_floor")


def test_a_bare_decode_reads_the_rows_the_context_decodes_and_leaves_the_cache_as_it_was(target_path):
    cfg = BackendConfig(n_ctx=64, n_threads=1)
    with Model(target_path, cfg) as model, Context(model, cfg) as ctx:
        ctx.eval([5, 6, 7, 8], logits="none")
        bare = round_floor.BareDecoder(ctx, 3)
        try:
            read = []
            outside, reads = bare.decode(4, 3, lambda row: read.append(row.copy()))
            read_again = []
            bare.decode(4, 3, lambda row: read_again.append(row.copy()))  # the rows were dropped: same again
        finally:
            bare.close()
        assert outside > 0 and len(reads) == 3
        expected = ctx.eval([100, 101, 102], logits="all")  # the same tokens at the same positions
        np.testing.assert_array_equal(np.array(read), expected)
        np.testing.assert_array_equal(np.array(read_again), expected)
        assert ctx.tokens == [5, 6, 7, 8, 100, 101, 102]


def test_it_refuses_a_busy_machine_before_loading_a_model(monkeypatch):
    monkeypatch.setattr(machine, "busy_processes", lambda seconds=1.0: ["make (4242): 97%"])
    monkeypatch.setattr(hub, "resolve", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr("sys.argv", ["round_floor.py"])
    with pytest.raises(SystemExit, match=r"Error: the machine is busy .*make \(4242\): 97%.*--allow-busy"):
        round_floor.main()


def test_a_missing_model_file_is_one_line_before_anything_is_measured(target_path, monkeypatch, tmp_path):
    monkeypatch.setattr("sys.argv", ["round_floor.py", "-m", target_path, "-d", str(tmp_path / "none.gguf"),
                                     "--allow-busy"])
    monkeypatch.setattr(round_floor, "measure", lambda *a, **k: pytest.fail("measured"))
    with pytest.raises(SystemExit, match=r"^Error: model file .*none\.gguf does not exist"):
        round_floor.main()
