"""One completion's text as its tokens arrive: what a streaming server may send now, and where a stop
string ends it.

Tokens are not characters. One character can take several tokens (a byte-level BPE spends up to four on
a non-ASCII one, and the text of the first ones ends in U+FFFD, the replacement for an incomplete UTF-8
sequence), and a stop string can begin inside one token and end inside another ("\\n\\n" made of "x\\n" and
"\\ny"). So the stop check runs on decoded text, never on token ids, and the text is released with two
holds:

- while the decoded text ends in an incomplete character, nothing is released (as generate's `show` does);
- text that could still be the start of a stop string ("\\n" while "\\n\\n" is a stop string) is held back
  until the next tokens settle it: either the stop string completes (the held text is dropped with it) or
  the text goes another way (the held text is released).

The whole completion is decoded again at every token (a token's text can depend on the tokens around it),
which costs O(length^2) characters over a completion, cheap next to a forward pass at the lengths served
here. Ids in `hidden` (end-of-text, a chat format's special tokens) are never shown. Each `add` returns
the text released and the records (token events) whose text is now released, so that log-probabilities
go out with the text of their tokens. Tested in tests/inference/test_text_stream.py against the text of
the whole completion cut at the first stop string.
"""

from __future__ import annotations

from typing import Callable

INCOMPLETE = "\ufffd"  # what decoding shows for a UTF-8 sequence whose remaining bytes have not come yet


class TextStream:
    def __init__(self, decode: Callable[[list[int]], str], hidden: set[int] = frozenset(), stop: list[str] = ()):
        if any(not s for s in stop):
            raise ValueError("a stop string must not be empty")
        self.decode, self.hidden, self.stop = decode, set(hidden), list(stop)
        self.ids: list[int] = []  # the visible ids so far
        self.num_tokens = 0  # every token taken, hidden ones included (what usage counts)
        self.sent = ""  # the text released so far
        self.stopped = False  # a stop string was found: the completion is over
        self._pending: list = []  # records whose token's text has not been released yet
        self._text = ""  # the last decoded text that ended in a complete character
        self.offsets: list[int] = []  # per token taken: where its text starts in the completion's text

    def add(self, token: int, record=None) -> tuple[str, list]:
        """Take the next token: (the text it releases, possibly "", and the records released with it)."""
        if self.stopped:
            raise RuntimeError("the completion already ended at a stop string; drop the tokens after it")
        self.num_tokens += 1
        self.offsets.append(len(self._text))
        self._pending.append(record)
        if token not in self.hidden:
            self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith(INCOMPLETE):
            return "", []  # wait for the rest of the character
        self._text = text
        cut = self._first_stop(text)
        if cut is not None:
            self.stopped = True
            return self._release(text[:cut], everything=True)
        return self._release(text[:len(text) - self._held(text)])

    def finish(self) -> tuple[str, list]:
        """The completion ended (length, end of text): whatever was held back, and the remaining records."""
        return self._release(self._text, everything=True)

    @property
    def text(self) -> str:
        return self.sent

    def _first_stop(self, text: str) -> int | None:
        """Where the earliest stop string in `text` begins, or None. Released text holds none, so the search
        starts where a stop string could end in new text."""
        start = max(0, len(self.sent) - max(map(len, self.stop), default=0) + 1)
        found = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _held(self, text: str) -> int:
        """Characters at the end of `text` that could be the start of a stop string (0 if none)."""
        return max((k for s in self.stop for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
                   default=0)

    def _release(self, upto: str, everything: bool = False) -> tuple[str, list]:
        new = upto[len(self.sent):] if len(upto) > len(self.sent) else ""
        self.sent += new
        records = []
        if new or everything:  # records go out with text (or at the end), never ahead of it
            records, self._pending = self._pending, []
        return new, [r for r in records if r is not None]
