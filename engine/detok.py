"""Incremental detokenization with stop strings, for streaming."""

from __future__ import annotations

from tokenizers import Tokenizer

CONTEXT = 6  # tokens decoded before a prompt token to find its text: enough for leading-space and byte rules


def texts_in_context(tokenizer: Tokenizer, contexts: list[list[int]], candidates: list[list[int]]) -> list[list[str]]:
    """For each context, the text each of its candidate tokens adds after it (special tokens written
    out; a token that ends inside a character gives U+FFFD, as vLLM's logprobs do)."""
    befores = tokenizer.decode_batch(contexts, skip_special_tokens=False)
    afters = iter(tokenizer.decode_batch([[*ctx, c] for ctx, cands in zip(contexts, candidates) for c in cands],
                                         skip_special_tokens=False))
    out = []
    for before, cands in zip(befores, candidates):
        row = []
        for c in cands:
            after = next(afters)
            row.append(after[len(before) :] if after.startswith(before) else tokenizer.decode([c], skip_special_tokens=False))
        out.append(row)
    return out


class TextStream:
    """Turns generated token ids into text deltas, holding back partial stop strings."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()) -> None:
        self._tok = tokenizer
        self._stop = stop
        self._ids: list[int] = []
        self._prefix = 0  # TGI-style offsets: decode a window so spacing stays right
        self._read = 0
        self._text = ""  # all text decoded so far
        self._emitted = 0  # characters of _text already handed out
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; return the text that can be shown now."""
        self._ids.append(token_id)
        before = self._tok.decode(self._ids[self._prefix : self._read], skip_special_tokens=True)
        after = self._tok.decode(self._ids[self._prefix :], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._text += after[len(before) :]
            self._prefix, self._read = self._read, len(self._ids)
        return self._release(final=False)

    def token_texts(self, token_ids: list[int]) -> list[str]:
        """The text each of ``token_ids`` would add after the tokens so far (before stop strings are
        applied; see :func:`texts_in_context`)."""
        return texts_in_context(self._tok, [self._ids[self._prefix :]], [token_ids])[0]

    def finish(self) -> str:
        """Flush whatever is left (incomplete characters, held-back text)."""
        if not self.stopped:
            tail = self._tok.decode(self._ids[self._prefix :], skip_special_tokens=True)
            done = self._tok.decode(self._ids[self._prefix : self._read], skip_special_tokens=True)
            self._text += tail[len(done) :]
            self._prefix = self._read = len(self._ids)
        return self._release(final=True)

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tok

    @property
    def text(self) -> str:
        """The final text (up to a stop string, if one was hit)."""
        return self._text[: self._emitted] if self.stopped else self._text

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        cut = len(self._text)
        for stop in self._stop:
            hit = self._text.find(stop, max(0, self._emitted - len(stop)))
            if hit != -1 and hit < cut:
                cut = hit
                self.stopped = True
        if not self.stopped and not final:
            cut -= self._held_back()
        delta = self._text[self._emitted : cut]
        self._emitted = max(self._emitted, cut)
        return delta

    def _held_back(self) -> int:
        """Length of the longest text suffix that could start a stop string."""
        best = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(self._text)), best, -1):
                if self._text.endswith(stop[:n]):
                    best = n
                    break
        return best
