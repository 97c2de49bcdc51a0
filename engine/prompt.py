"""Prompt text before it becomes tokens: a bound on its bytes, checked first, and tokenizing that
lets other threads run.

``tokenizers``' ``Tokenizer.encode`` holds the GIL for the whole call (a 4 MB prompt: 3.4 s in which
no other Python thread runs, measured on 2 cores), while ``encode_batch`` and ``encode_batch_fast``
release it; :func:`encode` therefore goes through the batch call with one text.

:class:`TextBound` is computed once from the tokenizer: the most bytes of input text one token can
stand for, times the context. A text longer than that can never fit, so it is refused in one line
without being tokenized. The bound errs on the side of never refusing a text that fits: it counts
each vocabulary entry at its most (a byte-level alphabet character is one input byte; a SentencePiece
``▁`` is counted at its three UTF-8 bytes although it usually stands for one space), and multiplies by
four after Unicode normalizers (NFKC can turn a 4-byte character into one). Added tokens that strip
the whitespace beside them (``lstrip``/``rstrip``, Phi-3's chat tokens) can absorb any run of
whitespace, so for such tokenizers ASCII whitespace is not counted. Where a tokenizer can drop text
without limit (a ``Strip`` normalizer, whitespace-splitting pre-tokenizers, fused unknown tokens) no
bound holds, and none is applied (:attr:`TextBound.unbounded` says why).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer

from .errors import RequestError

ASCII_WHITESPACE = b" \t\n\r\x0b\x0c"
UNICODE_FACTOR = 4  # a normalized character can stand for up to 4 input bytes (U+1D400 -> "A")
# normalizers and pre-tokenizers that never shrink their input
_KEEPS = {"Prepend", "Append", "ByteLevel", "Metaspace", "Punctuation", "Digits", "UnicodeScripts", "Sequence"}
_UNICODE = {"NFC", "NFD", "NFKC", "NFKD", "Lowercase"}


def encode(tokenizer: Tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids of ``text``, with the GIL released while the tokenizer runs."""
    batch = getattr(tokenizer, "encode_batch_fast", None) or tokenizer.encode_batch  # _fast: no offsets (tokenizers 0.20+)
    return batch([text], add_special_tokens=add_special_tokens)[0].ids


def utf8_size(text: str | bytes, what: str) -> int:
    """Bytes of ``text`` in UTF-8; a lone surrogate (JSON's ``\\ud800``) is refused in one line."""
    if isinstance(text, bytes):
        return len(text)
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise RequestError(f"{what} holds a lone surrogate ({text[exc.start]!r} at character {exc.start}), which is not "
                           "valid Unicode; send UTF-8 text") from None


@dataclass(frozen=True)
class TextBound:
    """The most bytes of text a model's context can hold: ``token_bytes`` per token (None: no bound,
    for the reason in ``unbounded``) times ``context`` tokens."""

    token_bytes: int | None
    context: int
    strips_whitespace: bool = False  # added tokens absorb the whitespace beside them: it is not counted
    unbounded: str = ""

    @classmethod
    def of(cls, tokenizer: Tokenizer, context: int) -> "TextBound":
        spec = json.loads(tokenizer.to_str())
        added = spec.get("added_tokens") or []
        strips = any(t.get("lstrip") or t.get("rstrip") for t in added)
        factor, why = _normalizer_factor(spec.get("normalizer"))
        if not why:
            why = _pre_tokenizer_drops(spec.get("pre_tokenizer"))
        if not why:
            per_token, why = _model_token_bytes(spec.get("model") or {}, _is_byte_level(spec))
        if why:
            return cls(None, context, strips, why)
        per_token = max([per_token, *(len(t.get("content", "").encode("utf-8")) for t in added)])
        return cls(per_token * factor, context, strips)

    @property
    def limit(self) -> int | None:
        """Bytes of text the context can hold at most (None: not bounded)."""
        return None if self.token_bytes is None else self.token_bytes * self.context

    def check(self, text: str | bytes, what: str, scale: int = 1) -> None:
        """Refuse ``text`` (the ``what`` input) if it is longer than the context could ever hold;
        ``scale`` allows for an encoding of the text that takes more bytes (JSON escapes: 6)."""
        size = utf8_size(text, what)
        limit = self.limit
        if limit is None or size <= limit * scale:
            return
        if self.strips_whitespace:
            raw = text if isinstance(text, bytes) else text.encode("utf-8")
            size = len(raw.translate(None, ASCII_WHITESPACE))
            if size <= limit * scale:
                return
        raise RequestError(
            f"{what} is {size:,} bytes, more than the {limit * scale:,} bytes the model's context of {self.context} tokens "
            f"could ever hold ({self.token_bytes} bytes per token at most{', in JSON' if scale > 1 else ''}); shorten the prompt")

    def describe(self) -> str:
        if self.limit is None:
            return f"prompts not bounded by bytes ({self.unbounded})"
        return f"prompts refused above {self.limit:,} bytes ({self.token_bytes} per token)"


def _kinds(node: dict[str, Any] | None) -> list[dict[str, Any]]:
    """A normalizer or pre-tokenizer and, for a Sequence, its parts, flattened."""
    if not node:
        return []
    parts = node.get("normalizers") or node.get("pretokenizers")
    return [node] if parts is None else [n for part in parts for n in _kinds(part)]


def _normalizer_factor(node: dict[str, Any] | None) -> tuple[int, str]:
    """How many input bytes one normalized byte can stand for, or why no number holds. Unicode
    normalizations together stand for at most 4; each shortening replacement multiplies."""
    unicode, replace = 1, 1
    for n in _kinds(node):
        kind = n.get("type")
        if kind in _UNICODE:
            unicode = UNICODE_FACTOR
        elif kind == "Replace":
            pattern, content = n.get("pattern") or {}, n.get("content") or ""
            if "String" not in pattern:
                return 0, f"the normalizer replaces a regular expression ({pattern.get('Regex')!r})"
            if not content:
                return 0, f"the normalizer deletes {pattern['String']!r}"
            replaced, by = len(pattern["String"].encode("utf-8")), len(content.encode("utf-8"))
            replace *= -(-replaced // by)  # a shorter replacement: its bytes stand for more input
        elif kind not in _KEEPS:
            return 0, f"the {kind} normalizer can drop text"
    return unicode * replace, ""


def _pre_tokenizer_drops(node: dict[str, Any] | None) -> str:
    for n in _kinds(node):
        kind = n.get("type")
        if kind == "Split" and str(n.get("behavior", "")).lower() != "removed":
            continue
        if kind not in _KEEPS:
            return f"the {kind} pre-tokenizer can drop text"
    return ""


def _is_byte_level(spec: dict[str, Any]) -> bool:
    return any(n.get("type") == "ByteLevel" for n in _kinds(spec.get("pre_tokenizer")))


def _model_token_bytes(model: dict[str, Any], byte_level: bool) -> tuple[int, str]:
    """The most input bytes one vocabulary entry stands for, or why there is no most."""
    kind = model.get("type")
    vocab = model.get("vocab") or {}
    tokens = [entry[0] for entry in vocab] if isinstance(vocab, list) else list(vocab)  # Unigram: [[piece, score], ...]
    has_unk = model.get("unk_token") is not None or model.get("unk_id") is not None
    if has_unk and not model.get("byte_fallback") and (model.get("fuse_unk") or kind in ("Unigram", "WordLevel")):
        return 0, "one unknown token can stand for any run of text"
    if byte_level:
        alphabet = set(_byte_alphabet())
        most = max((sum(1 if c in alphabet else len(c.encode("utf-8")) for c in t) for t in tokens), default=1)
    else:
        most = max((1 if _is_byte_token(t) else len(t.encode("utf-8")) for t in tokens), default=1)
    if kind == "WordPiece" and has_unk:  # one [UNK] stands for a whole word
        most = max(most, 4 * int(model.get("max_input_chars_per_word") or 100))
    elif has_unk:
        most = max(most, 4)  # an unknown character
    return most, ""


def _is_byte_token(token: str) -> bool:
    """SentencePiece's byte-fallback pieces: ``<0x41>``."""
    return len(token) == 6 and token.startswith("<0x") and token.endswith(">")


def _byte_alphabet() -> list[str]:
    """GPT-2's bytes-to-unicode characters: one per byte value."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(extra))]
