from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from gateway import detokenizer as detok_module
from gateway.detokenizer import IncrementalDetokenizer

TEXT = "héllo wörld ✓ 日本語 🎉"
BOS, EOS = "<s>", "</s>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of a ByteLevel BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    return table | {b: chr(256 + n) for n, b in enumerate(others)}


BYTE_CHAR = bytes_to_unicode()


def byte_chars(text: str) -> str:
    return "".join(BYTE_CHAR[b] for b in text.encode())


@pytest.fixture(scope="module")
def byte_bpe() -> Tokenizer:
    """All 256 bytes plus a few merges, some of which cross a character boundary:
    "é" whole, "ö"'s second byte glued to "r", "日"'s first two bytes, " w"."""
    vocab = {c: i for i, c in enumerate(sorted(BYTE_CHAR.values()))}
    merges = [
        (byte_chars("é")[0], byte_chars("é")[1]),
        (byte_chars("ö")[1], "r"),
        (byte_chars("日")[0], byte_chars("日")[1]),
        (byte_chars(" ")[0], "w"),
    ]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([BOS, EOS])
    return tokenizer


@pytest.fixture(scope="module")
def metaspace() -> Tokenizer:
    """SentencePiece-style: the decoder drops the space of a sequence's first word."""
    vocab = {"<unk>": 0, "▁Hello": 1, "▁world": 2, "!": 3}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.decoder = decoders.Metaspace()
    return tokenizer


def stream(detok: IncrementalDetokenizer, ids: list[int], step: int = 1) -> list[str]:
    chunks = [detok.push(ids[i:i + step]) for i in range(0, len(ids), step)]
    return chunks + [detok.flush()]


def test_tokenizer_splits_characters_across_tokens(byte_bpe):
    # The premise of the tests below: some tokens hold part of a character.
    ids = byte_bpe.encode(TEXT).ids
    assert sum("\ufffd" in byte_bpe.decode([i]) for i in ids) >= 8
    assert byte_bpe.decode(ids) == TEXT


def test_one_id_at_a_time_gives_exact_text_without_broken_chunks(byte_bpe):
    ids = byte_bpe.encode(TEXT).ids
    chunks = stream(IncrementalDetokenizer(byte_bpe), ids)
    assert "".join(chunks) == TEXT
    assert not any("\ufffd" in chunk for chunk in chunks)
    assert chunks[-1] == ""  # nothing was left for flush
    assert chunks.count("") > 1  # open characters were held back, then released whole
    assert "🎉" in chunks and "日" in chunks


@pytest.mark.parametrize("step", [2, 3, 5, 100])
def test_several_ids_per_push_give_the_same_text(byte_bpe, step):
    ids = byte_bpe.encode(TEXT).ids
    chunks = stream(IncrementalDetokenizer(byte_bpe), ids, step)
    assert "".join(chunks) == TEXT
    assert not any("\ufffd" in chunk for chunk in chunks)


def test_merge_across_a_character_boundary_emits_both_characters(byte_bpe):
    ids = byte_bpe.encode("ör").ids
    assert len(ids) == 2  # [first byte of ö] [second byte of ö + "r"]
    detok = IncrementalDetokenizer(byte_bpe)
    assert [detok.push([ids[0]]), detok.push([ids[1]])] == ["", "ör"]


def test_spaces_survive_chunk_borders(byte_bpe):
    text = " a  b   wide\tgap \n end "
    chunks = stream(IncrementalDetokenizer(byte_bpe), byte_bpe.encode(text).ids)
    assert "".join(chunks) == text
    assert chunks[:4] == [" ", "a", " ", " "]


def test_prompt_context_keeps_the_first_space(metaspace):
    assert metaspace.decode([2]) == "world"  # alone, the decoder drops the space
    detok = IncrementalDetokenizer(metaspace, prompt_ids=[1])
    assert [detok.push([2]), detok.push([3])] == [" world", "!"]


def test_without_prompt_matches_a_full_decode(metaspace):
    chunks = stream(IncrementalDetokenizer(metaspace), [1, 2, 3])
    assert chunks == ["Hello", " world", "!", ""]
    assert "".join(chunks) == metaspace.decode([1, 2, 3])


def test_prompt_ending_inside_a_character_completes_it(byte_bpe):
    ids = byte_bpe.encode("x日y").ids
    assert len(ids) == 4  # "x", first two bytes of 日, last byte of 日, "y"
    detok = IncrementalDetokenizer(byte_bpe, prompt_ids=ids[:2])
    assert [detok.push([ids[2]]), detok.push([ids[3]])] == ["日", "y"]


def test_special_tokens_are_skipped(byte_bpe):
    bos, eos = byte_bpe.token_to_id(BOS), byte_bpe.token_to_id(EOS)
    ids = [bos, *byte_bpe.encode(TEXT).ids, eos]
    chunks = stream(IncrementalDetokenizer(byte_bpe), ids)
    assert chunks[0] == "" and "".join(chunks) == TEXT


def test_special_tokens_kept_when_asked(byte_bpe):
    bos, eos = byte_bpe.token_to_id(BOS), byte_bpe.token_to_id(EOS)
    ids = [bos, *byte_bpe.encode(TEXT).ids, eos]
    chunks = stream(IncrementalDetokenizer(byte_bpe, skip_special_tokens=False), ids)
    assert "".join(chunks) == BOS + TEXT + EOS


def test_flush_returns_a_truncated_emoji_as_replacement(byte_bpe):
    ids = byte_bpe.encode("ok 🎉").ids[:-1]  # the emoji's 4th byte never comes
    detok = IncrementalDetokenizer(byte_bpe)
    chunks = [detok.push([i]) for i in ids]
    assert "".join(chunks) == "ok " and chunks[-3:] == ["", "", ""]
    assert detok.num_held_tokens == 3
    assert detok.flush() == "\ufffd"
    assert detok.flush() == ""


def test_held_ids_stay_few_over_a_long_stream(byte_bpe):
    """Per-token cost stays flat: only the ids of an open character are ever held (the window
    DecodeStream decodes is the last emission plus those)."""
    text = TEXT * 60
    ids = byte_bpe.encode(text).ids
    detok = IncrementalDetokenizer(byte_bpe)
    chunks, most_held = [], 0
    for i in ids:
        chunks.append(detok.push([i]))
        most_held = max(most_held, detok.num_held_tokens)
    assert "".join(chunks) + detok.flush() == text
    assert len(ids) > 1500 and most_held <= 3  # a 4-byte character, 3 of its tokens held


def test_invalid_bytes_are_released_within_a_bounded_window(byte_bpe):
    stray = byte_bpe.token_to_id(BYTE_CHAR[0x80])  # a continuation byte with no lead byte
    detok = IncrementalDetokenizer(byte_bpe)
    chunks = []
    for i in [stray] * 100 + byte_bpe.encode("ok").ids:
        chunks.append(detok.push([i]))
        assert detok.num_held_tokens < detok_module._MAX_HELD_TOKENS
    text = "".join(chunks) + detok.flush()
    assert text.endswith("ok") and "\ufffd" in text
    assert text == byte_bpe.decode([stray] * 100 + byte_bpe.encode("ok").ids)


def test_a_stream_that_refuses_its_window_falls_back_to_decoding_it(byte_bpe):
    """DecodeStream raises when a window's text is no prefix of the next one's: the detokenizer
    decodes that window itself and starts a new stream after it."""
    class Refusing:
        def step(self, tokenizer, ids):
            raise RuntimeError("invalid prefix")

    ids = byte_bpe.encode(TEXT).ids
    detok = IncrementalDetokenizer(byte_bpe)
    chunks = [detok.push([i]) for i in ids[:5]]
    detok._stream = Refusing()
    chunks += [detok.push(ids[5:9])]
    chunks += [detok.push([i]) for i in ids[9:]] + [detok.flush()]
    assert "".join(chunks) == TEXT
