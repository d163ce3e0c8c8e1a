"""Incremental detokenization: a stream of output ids in, a stream of text deltas out.

Decoding one token at a time is wrong twice over: sentencepiece drops the space of the
first piece it decodes ("▁world" alone is "world"), and a multi-byte character split over
byte tokens decodes to U+FFFD until its last byte arrives. So each step decodes a short
window of ids with some already-emitted ids in front of it and emits the difference:

    ids     = last CONTEXT_TOKENS prompt ids + output ids
    window  = ids[prefix:]             prefix: start of what the last emit decoded
    emitted = ids[:read]               read:   end of what has been emitted
    delta   = decode(ids[prefix:]) - decode(ids[prefix:read])

Invariants:
  * text == decode(context + output[:r]) with decode(context) cut off its front, where r is
    the read offset; with no prompt that is decode(output[:r]), and after finish() r covers
    all output. With a prompt, text is exactly what the output adds to the prompt's text (so
    sentencepiece's " world" keeps its space, which decode(output) alone would drop);
  * a delta never ends inside a UTF-8 character: a step whose decode ends in U+FFFD while
    the raw bytes of the ids not yet emitted end in an incomplete character emits nothing
    and waits. A U+FFFD from bytes that no continuation can repair (invalid UTF-8 from the
    model) is emitted, so the held window stays short;
  * each step decodes O(ids of the previous emit + held + new) ids, i.e. amortised O(new).
"""
from __future__ import annotations

from collections.abc import Sequence

from tpaserve.models.tokenizer import Tokenizer

# Prompt ids decoded in front of the output. Enough for sentencepiece's leading-space rule
# (one piece) and for a character split over up to 4 byte-fallback tokens; vLLM uses 5 too.
CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


def _ends_in_partial_char(tail: bytes) -> bool:
    """Whether `tail` ends with a UTF-8 lead byte followed by fewer continuation bytes than
    it announces (so more bytes could still complete it)."""
    for back in range(1, min(len(tail), 4) + 1):
        b = tail[-back]
        if b < 0x80:                      # ASCII: the text ends on a boundary
            return False
        if b < 0xC0:                      # continuation byte: keep looking for the lead
            continue
        need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4 if b < 0xF8 else 0
        return back < need
    return False


class IncrementalDetokenizer:
    """Detokenizes one request's output. Not thread-safe; one per request."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (),
                 skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = list(prompt_ids[-CONTEXT_TOKENS:])
        self._prefix = 0
        self._read = len(self._ids)
        self._prefix_text = tokenizer.decode(self._ids, skip_special_tokens)  # ids[prefix:read]
        self._text = ""

    @property
    def text(self) -> str:
        """All output text emitted so far."""
        return self._text

    def step(self, new_ids: Sequence[int]) -> str:
        """Take the next output ids; return the text they finish (possibly "")."""
        if not new_ids:
            return ""
        self._ids.extend(new_ids)
        return self._emit(force=False)

    def finish(self) -> str:
        """Emit whatever is held back, U+FFFD included; afterwards `text` covers all output."""
        return self._emit(force=True)

    def _emit(self, force: bool) -> str:
        if self._read == len(self._ids):
            return ""
        window_text = self._tok.decode(self._ids[self._prefix:], self._skip)
        if not force and window_text.endswith(_REPLACEMENT) and self._held_partial_char():
            return ""
        delta = window_text[len(self._prefix_text):]
        self._prefix, self._read = self._read, len(self._ids)
        self._prefix_text = self._tok.decode(self._ids[self._prefix:self._read], self._skip)
        self._text += delta
        return delta

    def _held_partial_char(self) -> bool:
        # Raw bytes of the not-yet-emitted ids, last 4 at most (a character's length bound).
        # A character cannot start before `read`: ids are only emitted on a boundary or
        # after bytes no continuation could complete.
        tail = b""
        for i in reversed(self._ids[self._read:]):
            if self._skip and i in self._tok.all_special_ids:
                continue  # skipped specials add no bytes to the decoded text
            tail = self._tok.token_bytes(i) + tail
            if len(tail) >= 4:
                break
        return _ends_in_partial_char(tail)
