"""Prompt-lookup n-gram index: pure tests against a brute-force reference."""

import random

import pytest

from ggspec.drafters.lookup import NgramIndex


def reference_propose(history, ngram_sizes, max_tokens):
    """Scan every earlier end position, longest n first, latest end first."""
    for n in sorted(set(ngram_sizes), reverse=True):
        if len(history) <= n:
            continue
        suffix = history[-n:]
        for end in range(len(history) - 1, n - 1, -1):
            if history[end - n:end] == suffix:
                return history[end:end + max_tokens]
    return []


def built(tokens, ngram_sizes=(4, 3, 2, 1)):
    index = NgramIndex(ngram_sizes)
    index.extend(tokens)
    return index


def test_longest_ngram_preferred_over_shorter():
    # suffix [1, 2, 3]: the 3-gram last occurred at the start (followed by 7);
    # the 2-gram [2, 3] occurred more recently (followed by 8)
    history = [1, 2, 3, 7, 0, 2, 3, 8, 0, 1, 2, 3]
    assert built(history).propose(1) == [7]
    assert built(history, ngram_sizes=(2, 1)).propose(1) == [8]


def test_most_recent_occurrence_preferred():
    history = [5, 6, 1, 5, 6, 2, 5, 6, 3, 5, 6]
    assert built(history).propose(1) == [3]


def test_continuation_truncated_to_max_tokens():
    history = [1, 2, 10, 11, 12, 13, 14, 0, 1, 2]
    assert built(history).propose(3) == [10, 11, 12]
    assert built(history).propose(0) == []


def test_continuation_stops_at_history_end_and_may_overlap_the_suffix():
    # repetition loop: the suffix [1, 2, 3] last ended at position 3, the rest follows it
    history = [1, 2, 3, 1, 2, 3]
    assert built(history).propose(10) == [1, 2, 3]


def test_no_match_gives_empty_list():
    assert built([1, 2, 3, 4, 5]).propose(4) == []
    assert built([]).propose(4) == []
    assert built([9]).propose(4) == []


def test_suffix_is_never_its_own_match():
    # [4, 4] occurs only as the suffix; the 1-gram [4] matches earlier at position 4
    history = [1, 2, 3, 4, 4]
    assert built(history).propose(5) == [4]
    assert built(history, ngram_sizes=(2,)).propose(5) == []


def test_default_sizes_skip_unigrams():
    index = NgramIndex()
    assert index.ngram_sizes == (5, 4, 3, 2)
    index.extend([1, 9, 2, 1])
    assert index.propose(4) == []


def test_sizes_are_sorted_and_deduplicated():
    assert NgramIndex([1, 3, 3, 2]).ngram_sizes == (3, 2, 1)


@pytest.mark.parametrize("sizes", [(), (0,), (2, -1), (2.0,)])
def test_bad_sizes_rejected(sizes):
    with pytest.raises(ValueError):
        NgramIndex(sizes)


def test_bad_arguments_rejected():
    index = built([1, 2, 1])
    with pytest.raises(ValueError):
        index.propose(-1)
    with pytest.raises(ValueError):
        index.truncate(-1)


def test_history_and_len():
    index = built([1, 2])
    index.extend(iter([3]))
    assert len(index) == 3
    assert index.history == (1, 2, 3)


def random_chunks(rng, tokens):
    """Split tokens into random pieces, empty ones included."""
    chunks, i = [], 0
    while i < len(tokens):
        size = rng.choice([0, 1, 1, 2, 3, 7])
        chunks.append(tokens[i:i + size])
        i += size
    return chunks


@pytest.mark.parametrize("seed", range(40))
def test_incremental_extend_matches_scratch_and_reference(seed):
    rng = random.Random(seed)
    sizes = rng.choice([(4, 3, 2, 1), (5, 4, 3, 2), (3, 1), (2,)])
    tokens = [rng.randrange(rng.choice([2, 3, 5])) for _ in range(rng.randrange(80))]
    index, history = NgramIndex(sizes), []
    for chunk in random_chunks(rng, tokens):
        index.extend(chunk)
        history += chunk
        for max_tokens in (1, 3, 8):
            expected = reference_propose(history, sizes, max_tokens)
            assert index.propose(max_tokens) == expected
            assert built(history, sizes).propose(max_tokens) == expected


@pytest.mark.parametrize("seed", range(40))
def test_truncate_then_extend_matches_fresh_index(seed):
    rng = random.Random(seed)
    sizes = (4, 3, 2, 1)
    tokens = [rng.randrange(3) for _ in range(rng.randrange(1, 60))]
    index = built(tokens, sizes)
    keep = rng.randrange(len(tokens) + 2)
    index.truncate(keep)
    assert index.history == tuple(tokens[:keep])
    tail = [rng.randrange(3) for _ in range(rng.randrange(20))]
    for chunk in random_chunks(rng, tail):
        index.extend(chunk)
    history = tokens[:keep] + tail
    fresh = built(history, sizes)
    assert index.history == fresh.history
    for max_tokens in (1, 4, 10):
        expected = reference_propose(history, sizes, max_tokens)
        assert index.propose(max_tokens) == fresh.propose(max_tokens) == expected


@pytest.mark.parametrize("seed", range(20))
def test_sync_matches_a_fresh_index(seed):
    rng = random.Random(seed)
    index = NgramIndex()
    for _ in range(10):
        tokens = [rng.randrange(3) for _ in range(rng.randrange(0, 40))]
        if rng.random() < 0.5 and len(index):
            tokens = list(index.history[:rng.randrange(len(index) + 1)]) + tokens
        index.sync(tokens)
        fresh = NgramIndex()
        fresh.extend(tokens)
        assert index.history == tuple(tokens)
        assert index.propose(8) == fresh.propose(8)
