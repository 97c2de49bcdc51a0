"""Prompts bounded by bytes before they are tokenized, and tokenizing that lets other threads run.

The bound is checked against real ``tokenizers`` tokenizers of the shapes LLMs ship: byte-level BPE
(GPT-2, Llama 3, Qwen: the demo model's), SentencePiece-style BPE with byte fallback, a ``▁``
replacement and chat tokens that strip the whitespace beside them (Llama 2, Phi-3, Mistral), and a
Unicode normalizer; each is trained here on a small corpus. For adversarial texts the bytes a text
takes never exceed the bound times the tokens it becomes, so no text that fits is ever refused.
"""

from __future__ import annotations

import random
import threading
import time

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from loraship.engine import RequestError, SamplingParams
from loraship.engine.prompt import ASCII_WHITESPACE, TextBound, encode

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "internationalization internationalization        indented   text\twith\ttabs",
    "def f(x):\n        return x  # code with runs of spaces\n",
    "Ünïcödé façade naïve café — “quotes” 漢字かな交じり文 😀😀",
    "𝐀𝐁𝐂 ﬁ ﬃ ① Ⅻ ｶﾀｶﾅ",
] * 20


def _sentencepiece_like() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    special = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=700, special_tokens=special, max_token_length=24))
    tok.add_special_tokens([AddedToken("<|end|>", rstrip=True), AddedToken("<|user|>", lstrip=True, rstrip=True)])
    return tok


def _byte_level(normalizer=None) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        special_tokens=["<|endoftext|>"]))
    return tok


TOKENIZERS = {
    "sentencepiece-like": _sentencepiece_like,
    "byte-level": _byte_level,
    "byte-level with NFKC": lambda: _byte_level(normalizers.NFKC()),
}


def _adversarial_texts(tok: Tokenizer, rng: random.Random) -> list[str]:
    """Texts made of the longest pieces the tokenizer has, whitespace runs after stripping tokens,
    characters a Unicode normalizer shrinks, and random mixes of every piece."""
    vocab = list(tok.get_vocab(with_added_tokens=True))
    longest = sorted(vocab, key=lambda t: len(tok.decode([tok.token_to_id(t)], skip_special_tokens=False).encode()))[-5:]
    texts = [tok.decode([tok.token_to_id(t)] * 50, skip_special_tokens=False) for t in longest]
    texts += ["<|end|>" + " " * 5000 + "hi", "<|user|>" + "\n" * 3000 + "<|end|>" + "\t " * 900,
              "𝐀" * 400, "ﬃ" * 300, " " * 4000, "\t\t\t\t" * 500]
    for _ in range(60):
        ids = [tok.token_to_id(t) for t in rng.choices(vocab, k=80)]
        texts.append(tok.decode(ids, skip_special_tokens=False))
    return texts


@pytest.mark.parametrize("name", TOKENIZERS)
def test_no_text_ever_takes_more_bytes_than_the_bound_allows_its_tokens(name):
    tok = TOKENIZERS[name]()
    bound = TextBound.of(tok, context=100)
    assert bound.token_bytes is not None and not bound.unbounded
    assert bound.strips_whitespace == (name == "sentencepiece-like")
    for text in _adversarial_texts(tok, random.Random(0)):
        tokens = len(encode(tok, text, add_special_tokens=False))
        counted = text.encode()
        if bound.strips_whitespace:
            counted = counted.translate(None, ASCII_WHITESPACE)
        assert len(counted) <= bound.token_bytes * max(tokens, 1), (name, text[:40], tokens)
        TextBound(bound.token_bytes, max(tokens, 1), bound.strips_whitespace).check(text, "text_input")  # fits: never refused


def test_bound_counts_normalizers_and_added_tokens():
    plain, nfkc = _byte_level(), _byte_level(normalizers.NFKC())
    assert TextBound.of(nfkc, 10).token_bytes == 4 * TextBound.of(plain, 10).token_bytes  # U+1D400 (4 bytes) -> "A"
    sp = _sentencepiece_like()
    longest_piece = max(len(t.encode()) for t in sp.get_vocab())
    assert TextBound.of(sp, 10).token_bytes == longest_piece  # "▁" counted at its 3 bytes: never fewer than it stands for


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (lambda t: setattr(t, "normalizer", normalizers.Strip()), "the Strip normalizer can drop text"),
        (lambda t: setattr(t, "normalizer", normalizers.Replace(" ", "")), "the normalizer deletes ' '"),
        (lambda t: setattr(t, "pre_tokenizer", pre_tokenizers.WhitespaceSplit()), "the WhitespaceSplit pre-tokenizer can drop text"),
    ],
)
def test_tokenizers_that_can_drop_text_without_limit_get_no_bound(build, reason):
    tok = _byte_level()
    build(tok)
    bound = TextBound.of(tok, 10)
    assert (bound.token_bytes, bound.limit, bound.unbounded) == (None, None, reason)
    bound.check("x" + " " * 10_000_000, "text_input")  # nothing refused
    assert "not bounded by bytes" in bound.describe()


def test_fused_unknown_tokens_have_no_bound():
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tok.train_from_iterator(CORPUS[:3], trainers.BpeTrainer(vocab_size=100, special_tokens=["<unk>"]))
    assert TextBound.of(tok, 10).unbounded == "one unknown token can stand for any run of text"


class CountingTokenizer:
    """The engine's tokenizer, counting the texts it is asked to tokenize."""

    def __init__(self, real: Tokenizer) -> None:
        self.real, self.calls = real, 0

    def encode_batch_fast(self, texts, **kwargs):
        self.calls += 1
        return self.real.encode_batch_fast(texts, **kwargs)


def test_the_engine_refuses_a_prompt_over_the_bound_without_tokenizing_it(engine, monkeypatch):
    bound = engine.text_bound
    assert bound.limit == bound.token_bytes * engine.max_context == 13 * 2048  # the demo tokenizer: "<|assistant|>"
    counting = CountingTokenizer(engine.tokenizer)
    monkeypatch.setattr(engine, "tokenizer", counting)
    with pytest.raises(RequestError) as refused:
        engine.request("x" * (4 << 20), SamplingParams(max_tokens=4))
    assert str(refused.value) == (f"text_input is 4,194,304 bytes, more than the {bound.limit:,} bytes the model's context of 2048 "
                                  "tokens could ever hold (13 bytes per token at most); shorten the prompt")
    with pytest.raises(RequestError, match=r"stop is 30,000 bytes, more than the 26,624 bytes"):
        engine.request("Hello", SamplingParams(max_tokens=4, stop=("y" * 30_000,)))
    with pytest.raises(RequestError, match="lone surrogate"):
        engine.request("a\ud800b", SamplingParams(max_tokens=4))
    assert counting.calls == 0
    # the longest piece (" projections", 12 bytes) 2000 times: 24,000 bytes in 2000 tokens (and BOS), admitted
    fits = " projections" * 2000
    assert len(engine.request(fits, SamplingParams(max_tokens=4)).prompt_ids) == 2001 and counting.calls == 1


def test_tokenizing_lets_other_threads_run(engine):
    """A thread ticking beside encode() of a 1 MB text keeps ticking: its longest pause is a small
    part of the call (Tokenizer.encode would hold the GIL, and the pause would be the whole call)."""
    text = "The quick brown fox jumps over the lazy dog. " * 23_000
    ticks: list[float] = []
    stop = threading.Event()

    def tick():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.0005)

    thread = threading.Thread(target=tick)
    thread.start()
    time.sleep(0.05)
    start = time.perf_counter()
    ids = encode(engine.tokenizer, text)
    end = time.perf_counter()
    time.sleep(0.05)
    stop.set()
    thread.join()
    assert len(ids) > 200_000
    during = [t for t in ticks if start <= t <= end] + [end]
    longest_pause = max(b - a for a, b in zip([start, *during], during))
    assert longest_pause < (end - start) / 4, (longest_pause, end - start)
