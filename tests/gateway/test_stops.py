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


def test_a_response_of_several_steps_ends_at_the_id_that_reaches_the_stop():
    """through_stops: the ids after the one whose text completes the stop string are cut, however
    many steps' ids the response holds; without stop strings every id goes."""
    from tokenizers import Tokenizer, decoders, models

    from gateway.core import through_stops
    from gateway.detokenizer import IncrementalDetokenizer

    words = ["<unk>", "▁one", "▁two", "▁EN", "D", "▁three", "▁four"]
    tokenizer = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)},
                                           unk_token="<unk>"))
    tokenizer.decoder = decoders.Metaspace()
    ids = [1, 2, 3, 4, 5, 6]  # one two END three four

    def cut(chunks, stops):
        detok, matcher, sent, text = IncrementalDetokenizer(tokenizer), StopMatcher(stops), [], ""
        for chunk in chunks:
            kept, piece, hit = through_stops(chunk, detok, matcher)
            sent, text = sent + kept, text + piece
            if hit:
                return sent, text, True
        return sent, text, False

    for chunks in ([ids], [ids[:2], ids[2:]], [[i] for i in ids], [ids[:3], ids[3:]]):
        assert cut(chunks, ["END"]) == ([1, 2, 3, 4], "one two ", True), chunks
    assert cut([ids], []) == (ids, "one two END three four", False)
