"""The engine's chat templates (jinja2 only, no transformers) give the token ids of transformers' own
``apply_chat_template(messages, add_generation_prompt=True)``, on the real Phi-3-mini and Llama-3 instruct
templates (their strings are in tests/chat_templates/; no model hub here).

Each template is installed in a tokenizer built like the real one: its special tokens added, and a
post-processor that prepends BOS to every ``encode`` (as Phi-3's and Llama-3's tokenizer.json do), so a
template that writes ``{{ bos_token }}`` itself would get a second BOS if the engine added special tokens.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from loraship.engine.chat import ChatTemplate, parse_messages
from loraship.engine.errors import RequestError

TEMPLATES = Path(__file__).parent / "chat_templates"

# (template file, bos, eos, the template's own special tokens)
FAMILIES = {
    "phi-3-mini-4k-instruct": ("<s>", "<|endoftext|>", ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]),
    "phi-3-mini-4k-instruct-2404": ("<s>", "<|endoftext|>", ["<|user|>", "<|assistant|>", "<|end|>"]),
    "meta-llama-3-8b-instruct": ("<|begin_of_text|>", "<|eot_id|>", ["<|start_header_id|>", "<|end_header_id|>"]),
    "llama-3.2-1b-instruct": ("<|begin_of_text|>", "<|eot_id|>", ["<|start_header_id|>", "<|end_header_id|>"]),
}

CONVERSATIONS = [
    [{"role": "user", "content": "What is LoRA?"}],
    [
        {"role": "system", "content": "You answer in one sentence."},
        {"role": "user", "content": "Hello, how are you today?"},
        {"role": "assistant", "content": "  I am fine, thank you.  "},
        {"role": "user", "content": "Ünïcode ✓, \"quotes\" and\nnew lines: explain what a transformer is."},
    ],
]


@pytest.fixture(scope="module")
def base_tokenizer(tmp_path_factory) -> Path:
    """The demo's byte-level BPE, trained once."""
    from loraship.export.demo_model import build_tokenizer

    folder = tmp_path_factory.mktemp("bpe")
    build_tokenizer(1024).save_pretrained(folder)
    return folder


def tokenizer_with(base: Path, out: Path, template: str | None, bos: str, eos: str, specials: list[str]):
    """A transformers tokenizer like the real family's, saved to ``out``; returns it."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    tok.add_special_tokens({"bos_token": bos, "eos_token": eos, "additional_special_tokens": specials})
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.convert_tokens_to_ids(bos))])
    tok.chat_template = template
    tok.save_pretrained(out)
    return tok


@pytest.mark.parametrize("family", list(FAMILIES))
def test_token_ids_equal_transformers_apply_chat_template(family, base_tokenizer, tmp_path):
    bos, eos, specials = FAMILIES[family]
    source = (TEMPLATES / f"{family}.jinja").read_text()
    hf = tokenizer_with(base_tokenizer, tmp_path, source, bos, eos, specials)
    assert (tmp_path / "chat_template.jinja").is_file()  # where transformers 4.57 saves it

    chat = ChatTemplate.load(tmp_path)
    engine_tokenizer = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    bos_id = hf.convert_tokens_to_ids(bos)
    for messages in CONVERSATIONS:
        expected = hf.apply_chat_template(messages, add_generation_prompt=True)
        assert chat.render(messages) == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = chat.encode(messages, engine_tokenizer)
        assert ids == expected
        if "bos_token" in source:
            # the template writes BOS itself: exactly one, where encoding with special tokens would give two
            assert ids[0] == bos_id and ids.count(bos_id) == 1
            assert engine_tokenizer.encode(chat.render(messages)).ids[:2] == [bos_id, bos_id]
        else:
            assert bos_id not in ids
        assert ids[-1] != hf.convert_tokens_to_ids(eos)  # ends with the generation prompt, not EOS


def test_llama_3_2_tool_calls_tojson_and_strftime_now_match_transformers(base_tokenizer, tmp_path):
    """tojson (non-ASCII kept), strftime_now (today's date) and raise_exception, as transformers defines them."""
    bos, eos, specials = FAMILIES["llama-3.2-1b-instruct"]
    hf = tokenizer_with(base_tokenizer, tmp_path, (TEMPLATES / "llama-3.2-1b-instruct.jinja").read_text(), bos, eos, specials)
    chat = ChatTemplate.load(tmp_path)
    call = {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "météo", "arguments": {"ville": "Zürich"}}}]}
    messages = [{"role": "user", "content": "Weather?"}, call, {"role": "tool", "content": {"temp": "12°C"}}]
    rendered = chat.render(messages)
    assert rendered == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert '"Zürich"' in rendered and '{"temp": "12°C"}' in rendered
    from datetime import datetime

    assert f"Today Date: {datetime.now().strftime('%d %b %Y')}" in rendered
    call["tool_calls"] = call["tool_calls"] * 2
    with pytest.raises(RequestError, match="only supports single tool-calls"):
        chat.render(messages)


def test_template_in_tokenizer_config_string_and_named_list_forms(base_tokenizer, tmp_path):
    """Older exports keep the template in tokenizer_config.json: a string, or a list of named templates."""
    source = (TEMPLATES / "phi-3-mini-4k-instruct.jinja").read_text()
    tokenizer_with(base_tokenizer, tmp_path, source, "<s>", "<|endoftext|>", ["<|user|>", "<|assistant|>", "<|end|>"])
    (tmp_path / "chat_template.jinja").unlink()
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    messages = CONVERSATIONS[1]
    expected = "<|system|>\nYou answer in one sentence.<|end|>\n<|user|>\nHello, how are you today?<|end|>\n"

    config_path.write_text(json.dumps({**config, "chat_template": source}))
    assert ChatTemplate.load(tmp_path).render(messages).startswith(expected)
    config_path.write_text(json.dumps({**config, "chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": source}]}))
    assert ChatTemplate.load(tmp_path).render(messages).startswith(expected)
    config_path.write_text(json.dumps({k: v for k, v in config.items() if k != "chat_template"}))
    assert ChatTemplate.load(tmp_path) is None


def test_generation_marker_renders_its_body_like_transformers(base_tokenizer, tmp_path):
    source = ("{% for m in messages %}{{ m['role'] }}: {% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}"
              "{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    hf = tokenizer_with(base_tokenizer, tmp_path, source, "<s>", "</s>", [])
    messages = CONVERSATIONS[1]
    assert ChatTemplate.load(tmp_path).render(messages) == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_bad_templates_and_messages_are_one_line_request_errors():
    with pytest.raises(RequestError, match="does not compile"):
        ChatTemplate("{% for m in messages %}{{ m }")
    sandboxed = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(RequestError, match="refused"):  # the sandbox blocks attribute escapes
        sandboxed.render([{"role": "user", "content": "x"}])
    for text, message in [("not json", "not valid JSON"), ("[]", "non-empty JSON list"), ('{"role": "user"}', "non-empty JSON list"),
                          ('[{"role": "user"}]', "messages[0]"), ('[{"role": 3, "content": "x"}]', "messages[0]")]:
        with pytest.raises(RequestError, match=re.escape(message)):
            parse_messages(text)
    assert parse_messages('[{"role": "user", "content": "hi"}]') == [{"role": "user", "content": "hi"}]
