import pytest

from ggspec.text import TextStream


def feed(stream: TextStream, chunks: list[bytes]) -> list[str]:
    return [stream.push([c])[0] for c in chunks] + [stream.flush()]


def test_multibyte_character_split_across_tokens_is_never_emitted_half():
    euro = "€".encode()  # 3 bytes
    pieces = feed(TextStream(), [b"a", euro[:1], euro[1:2], euro[2:], b"b"])
    assert pieces == ["a", "", "", "€", "b", ""]


def test_invalid_bytes_become_replacement_characters():
    assert "".join(feed(TextStream(), [b"ok", b"\xff", b"!"])) == "ok\ufffd!"


def test_incomplete_character_at_the_end_is_flushed_as_replacement():
    assert "".join(feed(TextStream(), [b"x", "€".encode()[:2]])) == "x\ufffd"


@pytest.mark.parametrize("chunks", [
    [b"hello ", b"STOP", b" more"],
    [b"hello S", b"TO", b"P more"],
    [b"hello ST", b"OP"],
])
def test_stop_string_ends_the_text_and_is_not_emitted(chunks):
    stream = TextStream(["STOP"])
    assert "".join(feed(stream, chunks)) == "hello "
    assert stream.stopped


def test_partial_stop_prefix_is_held_then_released():
    stream = TextStream(["STOP"])
    assert stream.push([b"go ST"]) == ("go ", 1)
    assert stream.push([b"AR"]) == ("STAR", 1)
    assert not stream.stopped


def test_earliest_of_several_stop_strings_wins():
    stream = TextStream(["world", "lo w"])
    assert "".join(feed(stream, [b"hello world"])) == "hel"


def test_text_after_stop_is_ignored():
    stream = TextStream(["\n\n"])
    assert stream.push([b"a\n"]) == ("a", 1)
    assert stream.push([b"\nb"]) == ("", 1)
    assert stream.push([b"c"]) == ("", 0) and stream.flush() == ""


def test_several_tokens_at_once_give_the_same_text_as_one_by_one():
    euro = "€".encode()
    tokens = [b"a", euro[:1], euro[1:2], euro[2:], b"b", b"\xff"]
    one_by_one = "".join(feed(TextStream(), tokens))
    stream = TextStream()
    text, kept = stream.push(tokens)
    assert text + stream.flush() == one_by_one == "a€b\ufffd" and kept == len(tokens)


@pytest.mark.parametrize("stops", [["STOP"], ["STOP", "zzz"]])
def test_a_stop_string_among_several_tokens_keeps_the_tokens_up_to_the_one_completing_it(stops):
    stream = TextStream(stops)
    assert stream.push([b"go ", b"S", b"TO", b"P", b" more", b"!"]) == ("go ", 4)
    assert stream.stopped and stream.push([b"x"]) == ("", 0)
