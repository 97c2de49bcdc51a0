"""Chat templates: a conversation rendered with the export's own Jinja template, as transformers does it.

transformers' ``apply_chat_template`` compiles the template in a jinja2 ``ImmutableSandboxedEnvironment``
(``trim_blocks``, ``lstrip_blocks``, the ``loopcontrols`` extension), with a ``tojson`` filter that keeps
non-ASCII text, the globals ``raise_exception`` and ``strftime_now``, and the tokenizer's special tokens
(``bos_token``, ``eos_token``, ...) as variables. The rendered text is tokenized without adding special
tokens: a template that wants BOS writes ``{{ bos_token }}`` itself, so the ids equal transformers'
``apply_chat_template(messages, add_generation_prompt=True)``.

The template is ``chat_template.jinja`` in the export folder (transformers 4.43+ writes it), else the
``chat_template`` of ``tokenizer_config.json`` (a string, or a list of named templates: ``default``).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from .errors import RequestError, one_line
from .prompt import encode

TEMPLATE_FILE = "chat_template.jinja"
# transformers' SPECIAL_TOKENS_ATTRIBUTES: each one that is set becomes a template variable.
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
                  "additional_special_tokens")


class ChatTemplate:
    """A compiled chat template and the special-token variables it is rendered with."""

    def __init__(self, source: str, special_tokens: dict[str, Any] | None = None) -> None:
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self._template = _compile(source)

    @classmethod
    def load(cls, folder: str | Path) -> "ChatTemplate | None":
        """The template of a tokenizer folder, or None when it has none."""
        folder = Path(folder)
        config = _read_json(folder / "tokenizer_config.json")
        path = folder / TEMPLATE_FILE
        source = path.read_text(encoding="utf-8") if path.is_file() else _config_template(config.get("chat_template"))
        if not source:
            return None
        return cls(source, _special_tokens(config, _read_json(folder / "special_tokens_map.json")))

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text of ``messages``; a template's ``raise_exception`` becomes a :class:`RequestError`."""
        from jinja2 import TemplateError

        try:
            return self._template.render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except TemplateError as exc:
            raise RequestError(f"the model's chat template refused these messages: {exc}") from None

    def encode(self, messages: list[dict[str, Any]], tokenizer: Tokenizer) -> list[int]:
        """Token ids of the rendered prompt, with the generation prompt and no special tokens added."""
        return encode(tokenizer, self.render(messages), add_special_tokens=False)


def parse_messages(text: str) -> list[dict[str, Any]]:
    """The ``messages`` input: a JSON list of ``{"role": ..., "content": ...}`` objects."""
    try:
        messages = json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested past Python's limit
        raise RequestError(f"messages is not valid JSON ({one_line(exc)}); send a JSON list of {{role, content}} objects") from None
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty JSON list of {role, content} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or "content" not in message:
            raise RequestError(f"messages[{i}] must be an object with a string role and a content")
    return messages


def _compile(source: str) -> Any:
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask marker) renders its body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise RequestError(f"the chat template does not compile: {exc} (line {exc.lineno})") from None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise RequestError(f"{path} is not valid JSON ({exc})") from None
    return data if isinstance(data, dict) else {}


def _config_template(value: Any) -> str | None:
    """tokenizer_config's ``chat_template``: a string, or ``[{"name", "template"}, ...]`` (the ``default`` one)."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default")
    return value if isinstance(value, str) else None


def _token(value: Any) -> str | None:
    """A special token as saved: a string, or an AddedToken dict with its ``content``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _special_tokens(config: dict[str, Any], special_map: dict[str, Any]) -> dict[str, Any]:
    """The set special tokens, as transformers' ``special_tokens_map`` passes them to the template."""
    out: dict[str, Any] = {}
    for name in SPECIAL_TOKENS:
        value = special_map.get(name, config.get(name))
        if name == "additional_special_tokens":
            tokens = [t for t in (_token(v) for v in value or []) if t]
            if tokens:
                out[name] = tokens
        elif (token := _token(value)) is not None:
            out[name] = token
    return out
