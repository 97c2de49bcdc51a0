"""/v1 with the official openai client: strings UTF-8 cannot encode (a lone surrogate answered a plain-text 500
and a reset connection) and integers beyond int32 (2**32+5 ran 5 tokens, 2**70 answered 500) get a 400 in
OpenAI's shape naming the parameter; the server keeps serving."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from .conftest import AUTH, MODEL

CHAT = [{"role": "user", "content": "Hello"}]


@pytest.mark.parametrize(("call", "param"), [
    (dict(messages=[{"role": "user", "content": "\ud800"}]), "messages.[0].content"),
    (dict(messages=[{"role": "user", "content": [{"type": "text", "text": "ok \udfff"}]}]), "messages.[0].content.[0].text"),
    (dict(messages=[{"role": "user", "content": "Hello", "name": "\ud800"}]), "messages.[0].name"),
    (dict(messages=CHAT, stop=["fine", "\ud801"]), "stop.[1]"),
    (dict(messages=CHAT, stop="\udc00"), "stop"),
    (dict(prompt="Hello \ud800"), "prompt"),
    (dict(prompt=["Hello", "\ud800"]), "prompt.[1]"),
])
def test_a_lone_surrogate_gets_400_naming_the_parameter(live, call, param):
    """JSON can escape a lone surrogate (``"\\ud800"``, as JavaScript's JSON.stringify writes one); UTF-8 cannot
    encode it. (The openai package cannot send one: it encodes the body as UTF-8 first, so httpx sends it.)"""
    route = "chat/completions" if "messages" in call else "completions"
    reply = httpx.post(f"{live.frontend.url}/{route}", content=json.dumps({"model": MODEL, "max_tokens": 2, **call}),
                       headers={**AUTH, "Content-Type": "application/json"}, timeout=60)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert (error["param"], error["type"]) == (param, "invalid_request_error") and "not valid Unicode" in error["message"]
    assert live.openai().chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2).usage.completion_tokens == 2


@pytest.mark.parametrize("value", [2**32 + 5, 2**31, 2**40, 2**70])
@pytest.mark.parametrize("param", ["max_tokens", "max_completion_tokens", "n", "top_logprobs", "logprobs"])
def test_integers_beyond_their_limits_get_400_naming_the_parameter(live, param, value):
    client = live.openai()
    if param == "logprobs":  # completions: an int (chat's logprobs is a bool)
        call = lambda: client.completions.create(model=MODEL, prompt="Hello", max_tokens=2, logprobs=value)  # noqa: E731
    else:
        extra = {"logprobs": True} if param == "top_logprobs" else {}
        call = lambda: client.chat.completions.create(model=MODEL, messages=CHAT, **{"max_tokens": 2, **extra, param: value})  # noqa: E731
    with pytest.raises(openai.BadRequestError) as info:
        call()
    assert info.value.body["param"] == param, info.value.body


def test_token_ids_beyond_int32_and_any_seed(live):
    """A token id of 2**40 wrapped into a valid id (200); a seed may be any integer, as OpenAI's."""
    client = live.openai()
    with pytest.raises(openai.BadRequestError, match="token id 1099511627776") as info:
        client.completions.create(model=MODEL, prompt=[1, 2**40], max_tokens=2)
    assert info.value.body["param"] == "prompt"
    for seed in (2**70, -(2**70)):
        reply = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3, seed=seed, temperature=1.0)
        again = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3, seed=seed, temperature=1.0)
        assert reply.usage.completion_tokens == 3 and reply.choices[0].message.content == again.choices[0].message.content
