"""Incremental detokenization: token ids in, new text out, never half a character.

Decoding the whole sequence after every token costs O(length) per token, and decoding each token
alone is wrong: a byte-level token can hold part of a UTF-8 character, and SentencePiece-style
decoders drop the space of a sequence's first token. `tokenizers.decoders.DecodeStream` solves
both in Rust: it decodes a short window (the ids of its last emission plus the new ones), returns
the text past the window's old text, and returns None while that text ends in an open character
(U+FFFD). Seeded with the prompt's ids, the first generated token gets its leading space, or the
rest of a character the prompt began.

Two things a server needs that DecodeStream leaves out are added here, on a rare path that
decodes the same window itself: `flush` at the end of a sequence returns what is still held (an
open character as U+FFFD), and a held tail that cannot become valid (more ids than a character
has bytes) is emitted rather than let the window, and the cost of every step, grow.
"""

from __future__ import annotations

from typing import Sequence

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

REPLACEMENT = "\ufffd"
_NUM_PROMPT_CONTEXT_TOKENS = 5  # prompt ids decoded before the first new id, for its leading space
# A UTF-8 character is at most 4 bytes, and every token but a skipped special one carries a byte,
# so a held tail this long that still ends in U+FFFD is truly invalid.
_MAX_HELD_TOKENS = 16


class IncrementalDetokenizer:
    """Text for a stream of generated ids; one instance per sequence.

    `prompt_ids` give the first generated token its context; their own text is never returned.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] | None = None,
                 skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        context = list(prompt_ids or ())[-_NUM_PROMPT_CONTEXT_TOKENS:]
        # A prompt that ends inside a character: that character is new text once ids complete it,
        # so its ids are held rather than taken as context.
        open_ids = context[self._start(context):]
        if open_ids:
            self._stream.step(tokenizer, open_ids)  # returns None: the character is still open
            self._held = open_ids

    @property
    def num_held_tokens(self) -> int:
        """Ids pushed whose text has not been returned yet."""
        return len(self._held)

    def push(self, new_ids: Sequence[int]) -> str:
        """Append ids; return the text they complete ("" while a character is still open)."""
        if not new_ids:
            return ""
        self._held.extend(new_ids)
        try:
            text = self._stream.step(self._tokenizer, list(new_ids))
        except Exception:  # noqa: BLE001 - a decoder whose window text is no prefix of the next
            return self.flush()  # (DecodeStream refuses those): decode the window here instead
        if text is not None:
            self._context, self._held = self._held, []
            return text
        return self.flush() if len(self._held) >= _MAX_HELD_TOKENS else ""

    def flush(self) -> str:
        """Whatever is held, an open character as U+FFFD (at the end of the sequence, or when the
        held tail can no longer become valid); the stream then starts after it."""
        if not self._held:
            return ""
        text = self._decode(self._context + self._held)[len(self._decode(self._context)):]
        self._start(self._held)
        return text

    def _start(self, ids: list[int]) -> int:
        """A fresh stream whose window holds the longest head of `ids` whose text ends in no open
        character (DecodeStream takes a window ending in U+FFFD as no text at all, and would
        return that text again); nothing held. Returns the head's length."""
        end = len(ids)
        while end and self._decode(ids[:end]).endswith(REPLACEMENT):
            end -= 1
        context = ids[:end]
        self._stream = DecodeStream(ids=context, skip_special_tokens=self._skip_special_tokens)
        self._context, self._held = context, []
        return end

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)
