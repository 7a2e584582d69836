"""Prompt lookup: longest match and source following, against brute-force references."""

import random

import numpy as np
import pytest

from ggspec.drafters import lookup
from ggspec.drafters.lookup import (AGREE, AHEAD, ALONE, DIFFER, MANY, OUTPUT, PROMPT, SEARCH_MAX, CopySource, History,
                                   LookupDrafter)


def reference_longest(history, max_len=SEARCH_MAX):
    """Every earlier end e with the longest agreeing suffix, by brute force."""
    n = len(history)
    best, ends = 0, []
    for e in range(1, n):
        length = 0
        while length < min(max_len, e) and history[e - 1 - length] == history[n - 1 - length]:
            length += 1
        if length > best:
            best, ends = length, [e]
        elif length == best and length > 0:
            ends.append(e)
    return best, ends


def source_after(history, max_tokens=8):
    source = CopySource()
    source.sync(history)
    return source.match(max_tokens)


def test_longest_match_prefers_length_over_recency():
    # suffix [1, 2, 3]: all three tokens last occurred at the start (followed by 7);
    # [2, 3] occurred more recently (followed by 8)
    history = [1, 2, 3, 7, 0, 2, 3, 8, 0, 1, 2, 3]
    assert source_after(history, 1).tokens == [7]
    assert source_after(history, 1).length == 3


def test_most_recent_of_equally_long_matches():
    history = [5, 6, 1, 5, 6, 2, 5, 6, 3, 5, 6]
    found = source_after(history, 1)
    assert found.tokens == [3] and found.length == 2


def test_continuation_stops_at_history_end_and_may_overlap_the_suffix():
    # repetition loop: the suffix [1, 2, 3] last ended at position 3, the rest follows it
    assert source_after([1, 2, 3, 1, 2, 3], 10).tokens == [1, 2, 3]
    assert source_after([1, 2, 10, 11, 12, 13, 0, 1, 2], 3).tokens == [10, 11, 12]


def test_no_match_gives_nothing():
    for history in ([1, 2, 3, 4, 5], [], [9]):
        assert source_after(history) == lookup.Match([])


def test_suffix_is_never_its_own_match():
    # [4, 4] occurs only as the suffix; [4] matches earlier at position 4
    found = source_after([1, 2, 3, 4, 4], 5)
    assert found.tokens == [4] and found.length == 1


@pytest.mark.parametrize("many", [MANY, 0])  # 0: every search compares as arrays
@pytest.mark.parametrize("seed", range(60))
def test_longest_match_equals_brute_force(seed, many, monkeypatch):
    monkeypatch.setattr(lookup, "MANY", many)
    rng = random.Random(seed)
    history = [rng.randrange(rng.choice([2, 3, 5])) for _ in range(rng.randrange(1, 120))]
    max_len = rng.choice([1, 3, 8, SEARCH_MAX])
    length, ends = History(history).longest_match(max_len)
    assert (length, list(ends)) == reference_longest(history, max_len)


@pytest.mark.parametrize("copies", [MANY // 2, MANY + 1, 5 * MANY])
def test_many_long_candidates_equal_brute_force(copies):
    """A line repeated many times: every copy agrees with the suffix for SEARCH_MAX
    tokens or almost, and a frequent pair followed by different text each time."""
    rng = random.Random(copies)
    line = [rng.randrange(1000) for _ in range(SEARCH_MAX + 8)]
    history = [t for i in range(copies) for t in line[:SEARCH_MAX - i % 3]] + line[:SEARCH_MAX]
    length, ends = History(history).longest_match()
    assert (length, list(ends)) == reference_longest(history)
    history = [t for _ in range(copies) for t in (7, 8, rng.randrange(3), rng.randrange(1000))] + [1, 7, 8]
    length, ends = History(history).longest_match()
    assert (length, list(ends)) == reference_longest(history)


@pytest.mark.parametrize("seed", range(20))
def test_history_cut_back_equals_a_rebuild(seed):
    rng = random.Random(seed)
    tokens = [rng.randrange(4) for _ in range(rng.randrange(1, 80))]
    history = History(tokens)
    history.array()
    for _ in range(10):
        n = rng.randrange(len(tokens) + 1)
        tokens = tokens[:n] + [rng.randrange(4) for _ in range(rng.randrange(5))]
        history.cut(n)
        history.extend(tokens[n:])
        rebuilt = History(tokens)
        assert history.tokens == tokens
        assert (history._one, history._two) == (rebuilt._one, rebuilt._two)
        assert history.array().tolist() == tokens


@pytest.mark.parametrize("many", [MANY, 0])  # 0: every source is followed as arrays
@pytest.mark.parametrize("seed", range(40))
def test_followed_source_is_a_valid_match_at_least_as_long_as_a_search(seed, many, monkeypatch):
    """Fed in random chunks (and sometimes rewound), the source always matches the
    history's suffix, and is at least as long as what a fresh search finds."""
    monkeypatch.setattr(lookup, "MANY", many)
    rng = random.Random(seed)
    source, history = CopySource(), []
    for _ in range(30):
        if rng.random() < 0.15 and history:
            history = history[:rng.randrange(len(history))]
        history = history + [rng.randrange(3) for _ in range(rng.choice([0, 1, 1, 2, 5]))]
        source.sync(history)
        assert source.history == history
        found = source.match(6)
        fresh = source_after(history, 6)
        assert found.length >= fresh.length
        if found.length:
            for end in source._ends:  # every source matches; the most recent is copied
                assert end < len(history)
                assert history[end - found.length:end] == history[len(history) - found.length:]
            assert found.tokens == history[source._ends[-1]:source._ends[-1] + 6]
            assert found.agreement == reference_agreement(history, list(source._ends), 6)


def reference_agreement(history: list[int], ends: list[int], k: int) -> list[int]:
    """Match.agreement by its definition, one copied token at a time."""
    end, n = ends[-1], len(history)
    first = history[end:end + k]
    agreement = []
    for i, x in enumerate(first):
        # the other sources that went on as the followed one up to token i, and have one there
        going = [e for e in ends[:-1] if e + i < n and history[e:e + i] == first[:i]]
        theirs = {history[e + i] for e in going}
        agreement.append(DIFFER if theirs - {x} else AGREE if theirs else ALONE)
    return agreement


def test_an_accepted_copy_is_followed_without_searching(monkeypatch):
    text = list(range(100, 140))
    history = text + [1, 2] + text[:5]  # the model started copying `text`
    drafter = LookupDrafter()
    first = drafter.match(history, 4)
    assert first.tokens == text[5:9] and first.length == 5
    searches = []
    monkeypatch.setattr(History, "longest_match", lambda *a: searches.append(a) or (0, []))
    history += text[5:8]  # three drafts accepted, then the target's own token agrees too
    history += [text[8]]
    followed = drafter.match(history, 4)
    assert followed.tokens == text[9:13] and followed.length == 9
    assert searches == []
    history += [999]  # the target deviates: a new search
    drafter.match(history, 4)
    assert len(searches) == 1


def test_lookup_method_needs_a_minimum_match():
    rng = np.random.default_rng(0)
    from ggspec import SamplingConfig
    drafter = LookupDrafter(min_match=2)
    assert drafter.propose([1, 9, 2, 1], 4, SamplingConfig(), rng).tokens == []
    assert drafter.propose([1, 9, 2, 1, 9], 4, SamplingConfig(), rng).tokens == [2, 1, 9]


def test_following_reports_how_the_source_predicted_the_committed_tokens():
    text = list(range(100, 140))
    source = CopySource()
    source.sync(text + [1] + text[:5])
    assert source.match(4).followed is None  # a search, nothing followed yet
    source.sync(text + [1] + text[:8])       # three tokens as the source continued
    assert source.match(4).followed == lookup.Followed(length=5, proposed=tuple(text[5:8]), hits=3, where=OUTPUT,
                                                      agreement=(ALONE,) * 3)
    source.sync(text + [1] + text[:10] + [7, 8])  # two more right, then a wrong one
    assert source.match(4).followed == lookup.Followed(length=8, proposed=tuple(text[8:11]), hits=2, where=OUTPUT,
                                                      agreement=(ALONE,) * 3)


def test_other_sources_give_differing_continuations_and_tell_when_they_were_right():
    # "1 2" followed by 3 4 (twice), 5 6 and, most recently, 7 8
    history = [1, 2, 3, 4, 9, 1, 2, 5, 6, 9, 1, 2, 3, 4, 9, 1, 2, 7, 8, 9, 0, 1, 2]
    source = CopySource()
    source.sync(history)
    found = source.match(2)
    assert found.tokens == [7, 8] and found.length == 2
    assert source.alternatives(2, 3) == [([3, 4], 2), ([5, 6], 1)]
    assert source.alternatives(2, 1) == [([3, 4], 2)]
    source.sync(history + [3, 4])  # the followed source was wrong, another right
    assert source.match(2).followed == lookup.Followed(2, (7,), 0, False, alternative=True, agreement=(DIFFER,))
    assert source.match(2).length == 4  # that source is followed now: no search
    source.sync(history + [3, 4, 1])  # "1 2 3 4" was followed by 9 both times: no other differed
    assert source.match(2).followed.alternative is None


@pytest.mark.parametrize("copies", [1, 20])  # 20: more sources than MANY, compared as arrays
def test_each_copied_token_says_whether_the_other_sources_agree_with_it(copies):
    # "0 1 2" went on with 3 4 9 and 3 5 9 (`copies` times each) and, most recently, 3 4 8
    history = [1, 2, 3, 4, 9] + [0, 1, 2, 3, 4, 9, 0, 1, 2, 3, 5, 9] * copies + [0, 1, 2, 3, 4, 8, 0, 1, 2]
    source = CopySource()
    source.sync(history)
    found = source.match(4)
    assert found.tokens == [3, 4, 8, 0] and found.length == 3
    # all agree on 3; one went on with 5 where it has 4; the rest with 9 where it has 8;
    # no other source went on as it did that far
    assert found.agreement == [AGREE, DIFFER, DIFFER, ALONE]
    assert source.match(4).agreement == found.agreement  # nothing new: the same source, followed
    source.sync(history + [3, 4, 9])  # right twice, then wrong where a source differed
    followed = source.match(4).followed
    assert followed.hits == 2 and followed.agreement == (AGREE, DIFFER, DIFFER)
    # the lookup method does not ask for it; a match that does afterwards still gets it right
    source = CopySource()
    source.sync(history)
    assert source.match(4, estimates=False).agreement == []
    source.sync(history + [3])
    assert source.match(4, estimates=False).followed is None  # (nor how the source fared)
    source.sync(history + [3, 4, 9])
    assert source.match(4).followed.agreement == (DIFFER, DIFFER)  # (from the source at 3)


def test_a_new_prompt_is_not_counted_as_predictions():
    drafter = LookupDrafter()
    drafter.prepare([1, 2, 3, 1, 2])
    assert drafter.match([1, 2, 3, 1, 2], 4).followed is None
    drafter.prepare([1, 2, 3, 1, 2, 3, 1, 2])  # the next prompt extends the last one
    assert drafter.match([1, 2, 3, 1, 2, 3, 1, 2], 4).followed is None


def reference_copyable(context, output):
    out = []
    for i in range(len(output)):
        text = context + output[:i]
        k = 0
        while i + k < len(output) and any(text[j:j + k + 1] == output[i:i + k + 1]
                                          for j in range(len(text) - k)):
            k += 1
        out.append(k)
    return out


@pytest.mark.parametrize("seed", range(30))
def test_copyable_equals_brute_force(seed):
    rng = random.Random(seed)
    context = [rng.randrange(4) for _ in range(rng.randrange(0, 40))]
    output = [rng.randrange(4) for _ in range(rng.randrange(0, 30))]
    assert lookup.copyable(context, output).tolist() == reference_copyable(context, output)


def test_a_source_in_the_prompt_is_told_apart_from_one_in_the_output():
    drafter = LookupDrafter()
    prompt = [5, 6, 7, 8, 9]
    drafter.prepare(prompt)
    assert drafter.match(prompt + [5, 6], 4).where == AHEAD       # copies the prompt
    out = prompt + [1, 2, 3, 4, 1, 2]
    found = drafter.match(out, 4)
    assert found.tokens == [3, 4, 1, 2] and found.where == OUTPUT  # copies the answer


def test_the_prompt_is_copied_in_order_from_where_the_last_copy_stopped():
    """Of equally long matches, the first in the prompt at or after the point the last
    right copy from it stopped is followed, not the most recent occurrence."""
    drafter = LookupDrafter()
    prompt = [1, 2, 10, 11, 1, 2, 20, 21, 9]
    drafter.prepare(prompt)
    found = drafter.match(prompt + [1, 2], 4)
    assert found.tokens == [10, 11, 1, 2] and found.where == AHEAD  # the first: nothing copied yet
    answer = [1, 2, 10, 11]                                         # copied two tokens: the cursor is at 4
    drafter.match(prompt + answer, 4)
    answer += [7]                                                   # a new token, then a token seen thrice
    assert drafter.match(prompt + answer, 4).tokens == []
    answer += [1]
    found = drafter.match(prompt + answer, 4)
    # the most recent occurrence of 1 is the answer's own, followed by 2 10 11 7
    assert found.tokens == [2, 20, 21, 9] and found.length == 1 and found.where == AHEAD


def test_a_source_that_takes_over_keeps_the_label_of_the_one_it_replaces():
    """When the followed source goes wrong and another that agreed with the text all along
    takes over (no new search), it inherits the AHEAD label, wherever it lies: labelling it
    by its own place replayed lower (docs/speed-notes.md)."""
    drafter = LookupDrafter()
    prompt = [1, 2, 3, 5, 7, 1, 2, 3, 4, 0, 6]
    drafter.prepare(prompt)
    answer = [3, 5]
    drafter.match(prompt + answer, 4)
    answer += [7, 9]                                                # copied 7: the cursor is at 5
    assert drafter.match(prompt + answer, 4).tokens == []
    answer += [1, 2]
    found = drafter.match(prompt + answer, 4)                       # 1 2 ends at 2 and 7: 7 is ahead
    assert found.tokens == [3, 4, 0, 6] and found.where == AHEAD
    answer += [3, 5]                                                # 3 right, then 5 where it has 4
    found = drafter.match(prompt + answer, 4)
    assert found.followed.hits == 1 and found.followed.where == AHEAD
    # the source behind the cursor (1 2 3 5 at the start) went on as the text did
    assert found.tokens == [7, 1, 2, 3] and found.length == 4 and found.where == AHEAD


def test_the_most_recent_occurrence_is_followed_where_the_prompt_has_none_ahead():
    drafter = LookupDrafter()
    prompt = [1, 2, 3, 4, 5, 6]
    drafter.prepare(prompt)
    answer = [3, 4, 5, 6]                                           # copies up to the prompt's end
    drafter.match(prompt + answer[:1], 4)
    drafter.match(prompt + answer, 4)
    answer += [9, 2]
    found = drafter.match(prompt + answer, 4)                       # 2: only in the prompt, behind the cursor
    assert found.tokens == [3, 4, 5, 6] and found.where == PROMPT
    answer += [7, 1]
    found = drafter.match(prompt + answer, 4)                       # 1: behind the cursor, and not in the answer
    assert found.tokens == [2, 3, 4, 5] and found.where == PROMPT
    answer += [8, 9]
    found = drafter.match(prompt + answer, 4)                       # 9: only in the answer
    assert found.tokens == [2, 7, 1, 8] and found.where == OUTPUT


@pytest.mark.parametrize("seed", range(30))
def test_sources_compared_as_arrays_or_lists_give_the_same_matches(seed, monkeypatch):
    """Many sources are followed (and many candidates searched) as arrays, few as lists:
    both give the same matches, reports and alternatives."""
    def run(many):
        monkeypatch.setattr(lookup, "MANY", many)
        rng = random.Random(seed)
        source, history, seen = CopySource(), [], []
        for _ in range(60):
            if rng.random() < 0.1 and history:
                history = history[:rng.randrange(len(history))]
            history = history + [rng.randrange(rng.choice([2, 4])) for _ in range(rng.choice([1, 2, 5, 9]))]
            source.sync(history)
            seen.append((source.match(8), source.alternatives(8, 3), list(source._ends)))
        return seen
    assert run(0) == run(10 ** 9)
