"""`loraship bench --chat` against a real tritonserver: each prompt goes as a user message in the model's template."""

from __future__ import annotations

from loraship.client.bench import run_bench

PROMPT = "Write a short poem about the sea."


def test_bench_chat_prompts_are_rendered_with_the_template(served):
    client = served.client("http")
    report = run_bench(client, [2], max_tokens=4, requests=4, prompts=[PROMPT], warmup=1, chat=True).to_json()
    [level] = report["levels"]
    templated = served.raw_generate([{"role": "user", "content": PROMPT}], max_tokens=1)["prompt_tokens"]
    assert level["errors"] == 0 and level["requests"] == 4 and report["config"]["chat"] is True
    assert level["prompt_tokens_mean"] == templated > served.raw_generate(PROMPT, max_tokens=1)["prompt_tokens"]
    assert level["completion_tokens_mean"] == 4
