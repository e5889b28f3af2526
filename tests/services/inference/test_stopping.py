"""Stop sequences and the streaming hold-back: pure text logic."""

from __future__ import annotations

from services.inference.stopping import StopScanner, find_stop


def run(scanner: StopScanner, growing: list[str]) -> list[str]:
    return [scanner.feed(text) for text in growing]


def test_find_stop_takes_the_earliest():
    assert find_stop("abc END xyz STOP", ["STOP", "END"]) == 4
    assert find_stop("abc", ["x"]) == -1
    assert find_stop("abc", []) == -1


def test_without_stops_everything_streams_at_once():
    scanner = StopScanner([])
    assert run(scanner, ["He", "Hello", "Hello world"]) == ["He", "llo", " world"]
    assert scanner.finish() == "" and scanner.text == "Hello world" and not scanner.stopped


def test_a_possible_stop_prefix_is_held_until_it_is_decided():
    scanner = StopScanner(["###"])
    assert run(scanner, ["ab#", "ab##", "ab##c"]) == ["ab", "", "##c"]
    assert not scanner.stopped


def test_stop_sequence_ends_the_text_and_is_never_sent():
    scanner = StopScanner(["\n\nUser:"])
    sent = run(scanner, ["Sure", "Sure.\n", "Sure.\n\nUs", "Sure.\n\nUser: more", "Sure.\n\nUser: more!"])
    assert "".join(sent) == "Sure." and scanner.text == "Sure."
    assert scanner.stopped
    assert scanner.finish() == ""


def test_stop_inside_one_token_and_earliest_of_several():
    scanner = StopScanner(["xyz", "b"])
    assert scanner.feed("aaxyzb") == "aa"
    assert scanner.stopped and scanner.text == "aa"


def test_half_decoded_characters_wait_for_the_next_token():
    scanner = StopScanner([])
    assert run(scanner, ["a\ufffd", "a\u00e9"]) == ["a", "\u00e9"]
    # Only the last one can still change: earlier ones are invalid bytes, sent as they are.
    assert run(scanner, ["a\u00e9\ufffd\ufffd"]) == ["\ufffd"]
    # An invalid byte at the very end is still text the client should get.
    assert scanner.finish() == "\ufffd"
    assert scanner.text == "a\u00e9\ufffd\ufffd"


def test_unfinished_prefix_is_flushed_when_generation_ends():
    scanner = StopScanner(["END"])
    assert scanner.feed("done EN") == "done "
    assert scanner.finish() == "EN"
    assert scanner.text == "done EN"
