"""Incremental detokenization: token ids in, new text out, never half a character.

Decoding the whole sequence after every token costs O(length) per token, and decoding each token
alone is wrong: a byte-level token can hold part of a UTF-8 character, and SentencePiece-style
decoders drop the space of a sequence's first token. So only a short window of the last tokens is
decoded, with two offsets into the ids:

    ids:   … | prefix_offset … | read_offset … | len(ids)
               └ already emitted ┘└ not yet emitted ┘
               (context only)

    prefix_text = decode(ids[prefix_offset:read_offset])      # text emitted last time
    new_text    = decode(ids[prefix_offset:])
    emit new_text[len(prefix_text):] unless it ends in U+FFFD  # else hold: a character is open

After an emission both offsets move forward (prefix_offset to the old read_offset), so the window
holds the tokens of the last emission plus those still held: O(1) per token.
"""

from __future__ import annotations

from typing import Protocol, Sequence

REPLACEMENT = "\ufffd"
_NUM_PROMPT_CONTEXT_TOKENS = 5  # decoded before the first new id, for its leading space
# A UTF-8 character is at most 4 bytes, and every token but a skipped special one carries a byte,
# so a held tail this long that still ends in U+FFFD is truly invalid: emit it rather than let the
# window (and the cost of every push) grow without bound.
_MAX_HELD_TOKENS = 16


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Text for a stream of generated ids; one instance per sequence.

    `prompt_ids` give the first generated token its context (its leading space, or the rest of a
    character the prompt began); their own text is never returned.
    """

    def __init__(self, tokenizer: Decoder, prompt_ids: Sequence[int] | None = None,
                 skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = list(prompt_ids or ())
        self._read_offset = len(self._ids)
        self._prefix_offset = max(0, self._read_offset - _NUM_PROMPT_CONTEXT_TOKENS)
        # A prompt that ends inside a character: the character is new text once ids complete it.
        while (self._read_offset > self._prefix_offset
               and self._decode(self._prefix_offset, self._read_offset).endswith(REPLACEMENT)):
            self._read_offset -= 1

    @property
    def num_held_tokens(self) -> int:
        """Ids pushed whose text has not been returned yet."""
        return len(self._ids) - self._read_offset

    def push(self, new_ids: Sequence[int]) -> str:
        """Append ids; return the text they complete ("" while a character is still open)."""
        self._ids.extend(new_ids)
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset, len(self._ids))
        if len(new_text) <= len(prefix_text):
            return ""  # nothing new yet (a skipped special token, or an open character)
        if new_text.endswith(REPLACEMENT) and self.num_held_tokens < _MAX_HELD_TOKENS:
            return ""
        return self._emit(new_text[len(prefix_text):])

    def flush(self) -> str:
        """At the end of the sequence: whatever is held, an open character as U+FFFD."""
        if not self.num_held_tokens:
            return ""
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset, len(self._ids))
        return self._emit(new_text[len(prefix_text):])

    def _emit(self, text: str) -> str:
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return text

    def _decode(self, start: int, stop: int) -> str:
        if start >= stop:
            return ""
        return self._tokenizer.decode(self._ids[start:stop],
                                      skip_special_tokens=self._skip_special_tokens)
