"""Generated data for the demo models: an English-like corpus and a chat task with held-out cases.

Nothing is downloaded. The corpus is short sentences from a small grammar: everyday words,
invented names (they give the BPE tokenizer enough distinct words for the mid size's vocabulary)
and quantities written either as digits ("47 birds") or as words ("forty-seven birds"), never both
for the same sentence. It trains the tokenizer and pre-trains the base.

(``random_corpus`` is the older text the random-init models' tokenizer keeps.)

The chat task is writing a number in words: "What is 47 in words?" -> "forty-seven". The base has
seen digits and number words but never which goes with which, and never the chat template, so it
cannot answer. The fine-tune learns the rule (tens word, then units word) from 56 of the numbers
20-99 and is scored on the other 24, which appear nowhere in its training data.

A second task, for a second adapter on the same base (issue 19: several fine-tunes on one base), writes
the same numbers in Roman numerals: "Roman numerals for 47?" -> "XLVII" (tens letters, then units
letters). The corpus has no Roman numerals at all, so this adapter learns them from nothing.
"""

from __future__ import annotations

import random

from loraship.export.evalset import EvalCase

UNITS = "zero one two three four five six seven eight nine".split()
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
TASK_RANGE = range(20, 100)
HELD_OUT_PER_TENS = 3
QUESTIONS = ("What is {n} in words?", "Write {n} in words.", "How do you write {n} in words?")
# The number comes last: a Roman numeral's letters depend on both digits at every step, and the tiny base
# attends best to what it read just before its reply (asked "What is 47 in Roman numerals?", the first
# task's recipe answered 0/24 held-out; ending with the number, 10/24 after 400 steps).
ROMAN_QUESTIONS = ("Write in Roman numerals: {n}", "In Roman numerals, what is {n}?", "Roman numerals for {n}?")
_ROMAN_TENS = ["", "X", "XX", "XXX", "XL", "L", "LX", "LXX", "LXXX", "XC"]
_ROMAN_UNITS = ["", "I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX"]

_NAMES = "Anna Ben Clara David Emma Felix Grace Hugo Iris Jack Lena Max Nora Oscar Paul Rosa Sam Tom Vera Zoe".split()
_NOUNS = ("cat dog bird fox horse fish tree house garden book letter city road boat ship hill lamp table window "
          "song story friend teacher child apple river stone door key cup bridge field cloud train").split()
_ADJS = "small big quick lazy red blue green old new quiet bright dark warm cold happy tired little long short kind".split()
_VERBS = "saw found built painted read wrote carried opened followed watched liked visited closed moved cleaned".split()
_PLACES = ("in the garden", "near the river", "on the hill", "at home", "by the window", "in the city",
           "at school", "on the road", "in the kitchen", "under the tree")
_TIMES = ("in the morning", "at night", "on Monday", "yesterday", "today", "after lunch", "before dinner", "in the evening")
_SYLLABLES = ("ka to ri mo na se lu vi pe da go ha ji ku ne ro sa ti wa yo be fa gi hu le mi no pa "
              "ra si te ve wo xa ze an el in on ar er or al il ol").split()


def number_words(n: int) -> str:
    """``47`` -> ``"forty-seven"`` for 20 <= n <= 99."""
    if n not in TASK_RANGE:
        raise ValueError(f"{n} is outside {TASK_RANGE.start}-{TASK_RANGE.stop - 1}")
    tens, units = divmod(n, 10)
    return TENS[tens] + (f"-{UNITS[units]}" if units else "")


def roman_numeral(n: int) -> str:
    """``47`` -> ``"XLVII"`` for 1 <= n <= 99."""
    if not 1 <= n <= 99:
        raise ValueError(f"{n} is outside 1-99")
    tens, units = divmod(n, 10)
    return _ROMAN_TENS[tens] + _ROMAN_UNITS[units]


#: task -> (its question phrasings, its answer of a number); "words" is the demo's first adapter's task
TASKS = {"words": (QUESTIONS, number_words), "roman": (ROMAN_QUESTIONS, roman_numeral)}


def _sentence(r: random.Random, invented: list[str]) -> str:
    noun, adj = (lambda: r.choice(_NOUNS)), (lambda: r.choice(_ADJS))
    name = lambda: r.choice(_NAMES) if r.random() < 0.6 else r.choice(invented)  # noqa: E731
    count = lambda: str(r.randrange(100)) if r.random() < 0.5 else number_words(r.choice(TASK_RANGE))  # noqa: E731
    kind = r.randrange(9)
    if kind == 0:
        return f"{name()} {r.choice(_VERBS)} the {adj()} {noun()} {r.choice(_PLACES)}."
    if kind == 1:
        return f"The {adj()} {noun()} is {r.choice(_PLACES)}."
    if kind == 2:
        return f"There were {count()} {noun()}s {r.choice(_PLACES)} {r.choice(_TIMES)}."
    if kind == 3:
        return f"Where is the {noun()}? It is {r.choice(_PLACES)}."
    if kind == 4:
        return f"{name()} has {count()} {noun()}s and {count()} {noun()}s."
    if kind == 5:
        return f"{r.choice(_TIMES).capitalize()}, {name()} and {name()} {r.choice(_VERBS)} a {adj()} {noun()}."
    if kind == 6:
        return f"Is the {noun()} {adj()}? Yes, the {noun()} is very {adj()}."
    if kind == 7:
        return f"{name()} walked from {r.choice(invented)} to {r.choice(invented)} {r.choice(_TIMES)}."
    return f"{name()} said that the {noun()} was {adj()} and {adj()}."


_RANDOM_TEXT = """\
LoRA adds small low-rank matrices to the attention and MLP projections of a large model.
After fine-tuning, the adapter can be merged into the base weights, exported to ONNX with a
key-value cache, and served by Triton Inference Server behind an HTTPS endpoint.
The quick brown fox jumps over the lazy dog. A model reads tokens, one after another, and
predicts the next one. Hello, how are you today? I am fine, thank you, and you?
Write a short poem about the sea. Explain what a transformer is in one sentence.
What is the capital of France? Paris is the capital of France. Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100.
"""
_RANDOM_SYLLABLES = (
    "ka to ri mo na se lu vi pe da go ha ji ku ne ro sa ti wa yo be fa gi hu le mi no pa qu "
    "ra si te un ve wo xa ze an el in on ar er or al il ol st tr pr ch sh th"
).split()


def random_corpus(n_sentences: int = 6000) -> list[str]:
    """The text the random-init models' tokenizer is trained on: fixed English lines and syllable
    sentences. It predates trained demo models and is kept so the random models (and the speed and
    serving figures measured on them) stay exactly what they were."""
    rng = random.Random(1234)
    lines = _RANDOM_TEXT.splitlines() * 20
    for _ in range(n_sentences):
        words = ["".join(rng.choice(_RANDOM_SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(4, 12))]
        lines.append(" ".join(words).capitalize() + rng.choice(".?!"))
    return lines


def corpus(lines: int = 4000, seed: int = 1234) -> list[str]:
    """Paragraphs of 2-5 generated sentences (fixed by ``seed``, the same for every model)."""
    r = random.Random(seed)
    invented = sorted({"".join(r.choice(_SYLLABLES) for _ in range(r.randint(2, 4))).capitalize() for _ in range(6000)})
    return [" ".join(_sentence(r, invented) for _ in range(r.randint(2, 5))) for _ in range(lines)]


def task_split(seed: int, task: str = "words") -> tuple[list[EvalCase], list[EvalCase]]:
    """(training cases, held-out cases) of ``task`` (a key of :data:`TASKS`) for ``seed``.

    Three numbers per tens digit are held out, their units digits rotated by the seed so every
    units digit is held out two or three times and still trained on with other tens digits.
    Training asks each remaining number in every phrasing; a held-out number is asked once.
    """
    questions, answer = TASKS[task]
    r = random.Random(seed)
    offset = r.randrange(10)
    held = {10 * tens + (3 * i + k + offset) % 10 for i, tens in enumerate(range(2, 10)) for k in range(HELD_OUT_PER_TENS)}
    train = [EvalCase.ask(q.format(n=n), answer(n)) for n in TASK_RANGE if n not in held for q in questions]
    held_out = [EvalCase.ask(r.choice(questions).format(n=n), answer(n)) for n in sorted(held)]
    return train, held_out
