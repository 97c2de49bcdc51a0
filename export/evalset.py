"""Eval sets: held-out chat questions and the answer each reply must start with (``eval.jsonl``).

One case per line: ``{"messages": [{"role": "user", "content": "..."}], "answer": "..."}``.
A reply is correct when, stripped of surrounding space, it starts with the answer and the answer
ends there, at a space or at sentence punctuation ("forty" is not an answer to "forty-seven").
The file travels with the model: ``demo-model`` writes it beside and inside the adapter, ``merge``
copies the adapter's (or ``--eval FILE``) into the merged folder, ``export`` copies the merged
folder's into the export (and ``repo`` the export's into the model version), and ``verify`` scores
the export on it through the engine.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loraship.errors import LorashipError

EVAL_FILE = "eval.jsonl"
_FORMAT = '{"messages": [{"role": "user", "content": "..."}], "answer": "..."}'
_ENDS = ".,;:!?)"


@dataclass(frozen=True)
class EvalCase:
    """A conversation to answer and the answer its reply must start with."""

    messages: tuple[dict[str, str], ...]
    answer: str

    @classmethod
    def ask(cls, question: str, answer: str) -> "EvalCase":
        return cls(({"role": "user", "content": question},), answer)

    @property
    def question(self) -> str:
        """The last user message."""
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")

    def to_json(self) -> dict[str, Any]:
        return {"messages": list(self.messages), "answer": self.answer}


def is_correct(reply: str, answer: str) -> bool:
    """Whether ``reply`` starts with ``answer`` as a whole word or phrase."""
    reply, answer = reply.strip(), answer.strip()
    if not reply.startswith(answer):
        return False
    rest = reply[len(answer):]
    return not rest or rest[0].isspace() or rest[0] in _ENDS


def _case(obj: Any) -> EvalCase:
    messages, answer = obj.get("messages"), obj.get("answer")
    if not isinstance(answer, str) or not answer.strip() or not isinstance(messages, list) or not messages:
        raise ValueError("needs non-empty messages and answer")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError("each message needs a role and a content string")
    if not any(m["role"] == "user" for m in messages):
        raise ValueError("no user message")
    return EvalCase(tuple({"role": m["role"], "content": m["content"]} for m in messages), answer)


def read_eval(path: Path) -> list[EvalCase]:
    """The cases of an ``eval.jsonl`` file; a one-line error naming the bad line otherwise."""
    path = Path(path)
    if not path.is_file():
        raise LorashipError(f"eval set not found: {path}", f"pass --eval a JSONL file with lines like {_FORMAT}")
    cases = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            cases.append(_case(json.loads(line)))
        except (json.JSONDecodeError, AttributeError, ValueError) as exc:
            raise LorashipError(f"bad eval case on line {number} of {path} ({exc})", f"write one case per line: {_FORMAT}") from exc
    if not cases:
        raise LorashipError(f"no eval cases in {path}", f"write one case per line: {_FORMAT}")
    return cases


def write_eval(path: Path, cases: list[EvalCase]) -> None:
    Path(path).write_text("".join(json.dumps(c.to_json()) + "\n" for c in cases))


def eval_source(explicit: Path | None, folder: Path) -> Path | None:
    """The eval set a stage carries into its output: ``explicit``, else ``folder/eval.jsonl`` if present.

    It is read here, so a malformed file fails before any heavy work or writing.
    """
    path = Path(explicit) if explicit is not None else Path(folder) / EVAL_FILE
    if explicit is None and not path.is_file():
        return None
    read_eval(path)
    return path


def copy_eval(source: Path | None, out: Path) -> None:
    """Copy an eval set found by :func:`eval_source` into the folder ``out`` (nothing if None)."""
    if source is not None:
        shutil.copyfile(source, Path(out) / EVAL_FILE)


NO_CHAT_TEMPLATE = ("the model's tokenizer has no chat template, so eval questions cannot be asked",
                "save the tokenizer with a chat_template (chat_template.jinja) and re-run merge and export")


def prompt_ids(tokenizer: Any, cases: list[EvalCase]) -> list[list[int]]:
    """Each case's conversation through the tokenizer's chat template, ready for the reply: the ids of
    transformers' ``apply_chat_template(add_generation_prompt=True)``, which a served chat also gets."""
    if not getattr(tokenizer, "chat_template", None):
        raise LorashipError(*NO_CHAT_TEMPLATE)
    return [list(tokenizer.apply_chat_template(list(c.messages), add_generation_prompt=True)) for c in cases]


def max_reply_tokens(tokenizer: Any, cases: list[EvalCase]) -> int:
    """Enough new tokens to see each answer and the character after it."""
    return 4 + max(len(tokenizer(c.answer, add_special_tokens=False)["input_ids"]) for c in cases)


@dataclass
class EvalResult:
    """Replies to an eval set and how many start with the expected answer."""

    questions: list[str]
    answers: list[str]
    replies: list[str]
    correct: list[bool] = field(init=False)

    def __post_init__(self) -> None:
        self.correct = [is_correct(r, a) for r, a in zip(self.replies, self.answers)]

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct) if self.correct else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "accuracy": self.accuracy}


def score(cases: list[EvalCase], replies: list[str]) -> EvalResult:
    return EvalResult([c.question for c in cases], [c.answer for c in cases], list(replies))
