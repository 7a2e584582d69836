"""tools/shaped_model.py: random weights in a real model's shapes and quantization, for
timing llama_decode where the real file cannot go."""

from __future__ import annotations

import gguf

from ggspec import BackendConfig, Engine, SamplingConfig, SpecConfig
from tinymodels import VOCAB
from toolfiles import load_tool

shaped_model = load_tool("shaped_model")

SMALL = dict(n_layer=1, n_embd=256, n_head=4, n_head_kv=2, n_ff=512, n_vocab=VOCAB.n_vocab + 300)


def test_a_shaped_model_has_the_shapes_and_types_asked_for_and_never_ends_an_answer(tmp_path):
    path = shaped_model.write(tmp_path / "shaped.gguf", SMALL, "q4_k_m", threads=1)
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert [int(n) for n in tensors["token_embd.weight"].shape] == [256, SMALL["n_vocab"]]
    assert [int(n) for n in tensors["blk.0.ffn_up.weight"].shape] == [256, 512]
    assert tensors["blk.0.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_K
    assert not list(tmp_path.glob("*.tmp"))  # the float32 intermediate is gone
    with Engine(str(path), None, target_config=BackendConfig(n_ctx=256, n_threads=1)) as engine:
        got = engine.generate([VOCAB.bos_id, 400, 500], max_tokens=40, sampling=SamplingConfig(temperature=0),
                              spec=SpecConfig("none"))
    # quantization noise would fire the tiny models' end-of-generation trigger at once
    assert got.finish_reason == "length" and len(got.tokens) == 40
