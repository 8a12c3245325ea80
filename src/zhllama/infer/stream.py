"""Text out of a growing list of token ids, safe for streaming.

Two things go wrong when a server decodes token by token. A Chinese character or an emoji that the tokenizer
spells as several byte tokens (``<0xE4><0xB8><0xAD>``) decodes to U+FFFD until its last byte arrives; and
decoding one token alone loses the space that its "▁" stands for. ``IncrementalDecoder`` decodes a window that
starts a few tokens back and emits only the text that is complete. ``StopStrings`` holds back the text that could
still turn into a stop string, so a client never sees the start of ``<|im_end|>``.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    """Feed ids one at a time (or several); get back the new, complete text each time."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)

    def push(self, *new_ids: int) -> str:
        self.ids.extend(int(i) for i in new_ids)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        if len(text) > len(prefix) and not text.endswith(REPLACEMENT):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix):]
        return ""

    def flush(self) -> str:
        """Whatever is left at the end (an incomplete byte sequence comes out as U+FFFDs, as decode gives it)."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix):]


class StopStrings:
    """Cut streamed text at the first stop string, holding back any tail that may be the start of one."""

    def __init__(self, stops: list[str] | tuple[str, ...]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[:min(hits)], ""
            return out
        hold = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(stop[:n]):
                    hold = max(hold, n)
                    break
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out
