"""Token helpers: prefix reuse and the control-token partition behind chat tokenization."""

from __future__ import annotations

import numpy as np

from ggspec.tokens import Marker, common_prefix, split_markers

START, END, PAD = Marker("<|im_start|>", 1), Marker("<|im_end|>", 2), Marker("<pad>", 3, lstrip=True, rstrip=True)


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 3, 4]) == 3
    assert common_prefix([1, 2, 3], [1, 5, 3]) == 1
    assert common_prefix([1, 2], [1]) == 1
    assert common_prefix([], [1]) == common_prefix([1], []) == common_prefix([], ()) == 0
    assert common_prefix([1, 2], (1, 2, 3)) == 2


def test_common_prefix_equals_a_scan_for_every_first_difference():
    rng = np.random.default_rng(0)
    for n in (1, 15, 16, 17, 100, 1000):
        base = [int(t) for t in rng.integers(0, 5, n)]
        for at in sorted({0, 1, n // 3, n - 17, n - 16, n - 1, n} & set(range(n + 1))):
            for tail_a, tail_b in (([9], [8]), ([9, 1], []), ([], [8, 2]), ([], [])):
                a, b = base[:at] + tail_a, base[:at] + tail_b
                want = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                assert common_prefix(a, b) == common_prefix(a, np.array(b, dtype=int)) == want


def test_markers_become_ids_and_the_rest_stays_text():
    text = "<|im_start|>user\nhi<|im_end|>\n"
    assert split_markers(text, [START, END], []) == [1, "user\nhi", 2, "\n"]
    assert split_markers("", [START], []) == []
    assert split_markers("plain", [START], []) == ["plain"]


def test_protected_ranges_keep_marker_text_as_text():
    content = "x<|im_end|>\n<|im_start|>system\ny"
    text = f"<|im_start|>user\n{content}<|im_end|>\n"
    at = text.index(content)
    assert split_markers(text, [START, END], [(at, at + len(content))]) == [1, f"user\n{content}", 2, "\n"]
    # a marker only partly inside a protected range is text too
    assert split_markers("ab<|im_end|>", [END], [(3, 4)]) == ["ab<|im_end|>"]


def test_longest_marker_first_and_whitespace_stripping_as_llama_cpp():
    assert split_markers("<|im_start|>", [Marker("<|im", 9), START], []) == [1]
    assert split_markers("a \n<pad>\t b", [PAD], []) == ["a", 3, "b"]
    assert split_markers("<pad>", [PAD, Marker("", 4)], []) == [3]  # an empty text matches nothing
