"""Stop strings over streamed text: exact cut, minimal hold-back."""

from gateway.stops import StopMatcher


def feed(matcher, chunks):
    out, hit = "", False
    for chunk in chunks:
        text, hit = matcher.push(chunk)
        out += text
        if hit:
            return out, True
    return out + matcher.flush(), False


def test_stop_inside_one_chunk():
    assert feed(StopMatcher(["END"]), ["abc END def"]) == ("abc ", True)


def test_stop_split_across_chunks_is_held_back_not_emitted():
    m = StopMatcher(["END"])
    assert m.push("abcE") == ("abc", False)  # "E" could still start "END"
    assert m.push("N") == ("", False)
    assert m.push("Dxyz") == ("", True)


def test_a_partial_match_that_fails_is_released():
    m = StopMatcher(["END"])
    assert m.push("xEN") == ("x", False)
    assert m.push("o") == ("ENo", False)


def test_earliest_of_several_stops_wins():
    assert feed(StopMatcher(["zz", "b"]), ["a", "bzz"]) == ("a", True)


def test_no_stop_emits_everything_in_the_end():
    assert feed(StopMatcher(["###"]), ["he", "llo", " wor", "ld"]) == ("hello world", False)


def test_no_stops_holds_nothing_back():
    assert StopMatcher([]).push("abc") == ("abc", False)
