"""The trained demo fine-tune: it learned its task, keeps it through merge, export, quantization and serving.

One ``loraship demo-model`` run per session (the ``trained`` fixture). Real transformers
generation, real optimum and onnxruntime-genai exports, real ONNX Runtime sessions, a real
tritonserver (nvidia-pytriton's binary) on loopback.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest

from loraship.export.demo_data import task_split
from loraship.export.demo_model import PAD_ID, STOP_IDS
from loraship.export.evalset import read_eval

MIN_ACCURACY = 0.9
ROMAN_MIN_ACCURACY = 0.5  # Roman numerals repeat letters, which the 0.56M model must count: 15/24 with seed 0


def _numbers(text: str) -> set[int]:
    return {int(n) for n in re.findall(r"\d+", text)}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _greedy_replies(model_dir: Path, cases, with_bos: bool) -> list[tuple[str, str]]:
    """(reply, answer) per case: transformers' own apply_chat_template and generate, greedy."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for case in cases:
        if with_bos:  # the rendered text through the tokenizer, which adds <s> (as the engine does)
            text = tok.apply_chat_template(list(case.messages), tokenize=False, add_generation_prompt=True)
            ids = tok(text, return_tensors="pt")["input_ids"]
        else:  # apply_chat_template(tokenize=True) adds no <s>
            ids = tok.apply_chat_template(list(case.messages), add_generation_prompt=True, return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                 eos_token_id=STOP_IDS, pad_token_id=PAD_ID)
        out.append((tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True), case.answer))
    return out


def test_demo_model_learned_the_task_on_held_out_questions(trained):
    """The base answers none of the held-out questions; the merged fine-tune answers >= 90%,
    through transformers' own chat template and greedy generate, with and without <s>."""
    from loraship.export.evalset import is_correct

    report = json.loads((trained.demo / "demo_model.json").read_text())
    assert report["random"] is False and report["eval_cases"] >= 20
    assert report["base_accuracy"] <= 0.1 and report["merged_accuracy"] >= MIN_ACCURACY, report
    cases = read_eval(trained.demo / "eval.jsonl")
    for with_bos in (True, False):
        replies = _greedy_replies(trained.merged, cases, with_bos)
        accuracy = sum(is_correct(r, a) for r, a in replies) / len(replies)
        assert accuracy >= MIN_ACCURACY, replies
    base = _greedy_replies(trained.demo / "base", cases, True)
    assert sum(is_correct(r, a) for r, a in base) / len(base) <= 0.1, base


def test_eval_set_is_held_out_and_travels_with_the_adapter(trained):
    """eval.jsonl: >= 20 cases in the documented format, none of whose numbers (and so none of whose
    questions) appear in train.jsonl; merge carried it into the merged folder unchanged."""
    lines = (trained.demo / "eval.jsonl").read_text().splitlines()
    assert len(lines) >= 20
    for line in lines:
        case = json.loads(line)
        assert set(case) == {"messages", "answer"} and [m["role"] for m in case["messages"]] == ["user"]
    held_out, train = read_eval(trained.demo / "eval.jsonl"), read_eval(trained.demo / "train.jsonl")
    train_text = "\n".join(c.question + " " + c.answer for c in train)
    eval_numbers = set().union(*(_numbers(c.question) for c in held_out))
    assert len(eval_numbers) == len(held_out) and not eval_numbers & _numbers(train_text)
    assert not {c.answer for c in held_out} & {c.answer for c in train}
    assert [c.to_json() for c in task_split(0)[1]] == [c.to_json() for c in held_out]
    for folder in (trained.demo / "adapter", trained.merged):
        assert (folder / "eval.jsonl").read_bytes() == (trained.demo / "eval.jsonl").read_bytes()


def test_chat_template_is_plain_jinja(trained):
    """The template renders the same through transformers and through a bare jinja2 environment;
    the trained tokenizer gives each digit its own token."""
    import jinja2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(trained.merged)
    template = (trained.merged / "chat_template.jinja").read_text()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 47 in words?"}]
    rendered = jinja2.Environment().from_string(template).render(messages=messages, add_generation_prompt=True)
    assert rendered == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|system|>\nBe brief.<|end|>\n<|user|>\nWhat is 47 in words?<|end|>\n<|assistant|>\n"
    assert tok.convert_ids_to_tokens(tok("in 1947")["input_ids"])[-4:] == ["1", "9", "4", "7"]  # one token per digit
    assert len(tok) == json.loads((trained.merged / "config.json").read_text())["vocab_size"] == 1024


def test_same_seed_same_model(tmp_path, run_cli, monkeypatch):
    """Two `loraship demo-model` runs with the same seed write byte-identical weights, tokenizer and eval
    set, and report the same accuracies. A short schedule (40 pretraining and 20 fine-tuning steps, the
    tiny recipe's batches, rate and threads) runs every training and scoring step of the 700-step one."""
    from dataclasses import replace

    from loraship.export import demo_model

    tiny = demo_model.RECIPES["tiny"]
    monkeypatch.setitem(demo_model.RECIPES, "tiny", replace(tiny, pretrain=replace(tiny.pretrain, steps=40),
                                                              finetune=replace(tiny.finetune, steps=20)))
    runs = []
    for name in ("first", "again"):
        code, stdout, err = run_cli(["demo-model", "--out", str(tmp_path / name), "--seed", "0"])
        assert code == 0, err
        assert stdout.strip() == str(tmp_path / name)
        report = json.loads((tmp_path / name / "demo_model.json").read_text())
        n = report["eval_cases"]
        base, merged = round(n * report["base_accuracy"]), round(n * report["merged_accuracy"])
        assert f"held-out questions answered {base}/{n} by the base, {merged}/{n} after the fine-tune" in " ".join(err.split())
        runs.append((base, merged))
    assert runs[0] == runs[1] and n == 24
    for rel in ("base/model.safetensors", "adapter/adapter_model.safetensors", "tokenizer/tokenizer.json",
                "eval.jsonl", "train.jsonl"):
        assert _sha(tmp_path / "first" / rel) == _sha(tmp_path / "again" / rel), rel
    assert "second_task" not in report and not list((tmp_path / "again").glob("adapter-*"))  # one adapter, as always
    assert [c.answer for c in task_split(1)[1]] != [c.answer for c in task_split(0)[1]]  # the seed picks the split


def test_fp32_export_parity_and_eval_through_the_engine(trained, run_cli):
    """fp32 (optimum): logits within 1e-4, identical greedy tokens, and the engine answers the
    eval set exactly as PyTorch does."""
    onnx = trained.export("fp32")
    assert (onnx / "eval.jsonl").read_bytes() == (trained.merged / "eval.jsonl").read_bytes()
    code, stdout, err = run_cli(["verify", "--merged", str(trained.merged), "--onnx", str(onnx), "--json"])
    assert code == 0, err
    report = json.loads(stdout)
    assert report["passed"] and report["tokens_identical"] and report["max_abs_logit_diff"] < 1e-4
    ev = report["eval"]
    assert ev["file"] == str(onnx / "eval.jsonl") and ev["cases"] == 24
    assert ev["engine"]["replies"] == ev["torch"]["replies"] and ev["same_replies"] == 1.0
    assert ev["engine_accuracy"] == ev["torch_accuracy"] >= MIN_ACCURACY
    assert json.loads((onnx / "loraship.json").read_text())["verify"]["eval"] == ev
    print(f"fp32 eval accuracy {ev['engine_accuracy']:.3f}")


@pytest.mark.parametrize("name", ["fp16", "int4"])
def test_fp16_and_int4_exports_keep_the_fine_tune(trained, name):
    """fp16 (optimum) and int4 (genai builder, MatMulNBits): the eval set is still answered >= 90%
    through the engine, with PyTorch's replies; fp16's greedy tokens also agree on free-running text."""
    from loraship.export.verify import verify

    report = verify(trained.merged, trained.export(name), min_accuracy=MIN_ACCURACY)
    assert report.dtype == name and report.passed, report.to_dict()
    assert report.eval is not None and report.eval.engine.accuracy >= MIN_ACCURACY
    assert report.eval.same_replies >= 0.9  # the engine's replies are PyTorch's, question by question
    if name == "fp16":  # int4 changes free-running text (verify's default prompts) within a few tokens
        assert report.token_agreement >= 0.9
    print(f"{name}: eval accuracy {report.eval.engine.accuracy:.3f} (PyTorch {report.eval.torch.accuracy:.3f}), "
          f"token agreement {report.token_agreement:.3f}, max|dlogit| {report.max_abs_logit_diff:.3g}")


def test_min_accuracy_fails_with_one_line(trained, tmp_path, run_cli):
    """--min-accuracy above what the export reaches fails verify; an eval set with wrong answers
    given by --eval scores 0 and names both accuracies."""
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text("".join(json.dumps({**c.to_json(), "answer": "eleventy"}) + "\n"
                             for c in read_eval(trained.demo / "eval.jsonl")[:4]))
    code, stdout, err = run_cli(["verify", "--merged", str(trained.merged), "--onnx", str(trained.export("fp32")),
                                 "--eval", str(wrong), "--min-accuracy", "0.5", "--max-new-tokens", "4"])
    assert code == 1
    assert err.strip().splitlines()[-1] == ("Error: eval accuracy 0.0% through the engine is below --min-accuracy 50% "
                                            "(PyTorch: 0.0%) (export at a higher precision (fp16 or fp32), or lower "
                                            "--min-accuracy if the loss is expected)")


def test_qlora_merge_keeps_the_fine_tune(trained, tmp_path):
    """The QLoRA path: the adapter's tensors in bf16 and a base config that says bitsandbytes 4-bit;
    merge still loads the base in full precision and the merged model answers >= 90%."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraship.export.merge import merge
    from loraship.export.verify import torch_replies

    adapter = tmp_path / "qlora"
    shutil.copytree(trained.demo / "adapter", adapter)
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(adapter / "adapter_model.safetensors").items()}
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    base = tmp_path / "base-4bit-config"
    shutil.copytree(trained.demo / "base", base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                     "bnb_4bit_compute_dtype": "bfloat16"}
    (base / "config.json").write_text(json.dumps(config))

    out = merge(base, adapter, tmp_path / "merged")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    model, tok = AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)
    result = torch_replies(model, tok, read_eval(out / "eval.jsonl"), PAD_ID, STOP_IDS)
    assert result.accuracy >= MIN_ACCURACY, result.to_dict()


@pytest.mark.slow
def test_served_answers_equal_in_process_answers(trained, tmp_path):
    """The default export served by a real tritonserver answers each eval question with the same text as
    the engine in-process, over gRPC and HTTP: as a chat (``messages``, templated by the server) and as
    text rendered by the client with transformers' apply_chat_template (``text_input``, which adds <s>)."""
    from transformers import AutoTokenizer

    from loraship.client import Client
    from loraship.engine import Engine, SamplingParams
    from loraship.engine.chat import ChatTemplate
    from loraship.export.evalset import score
    from loraship.triton_repo.config import ModelOptions
    from loraship.triton_repo.layout import write_version
    from loraship.triton_repo.server import TritonServer

    onnx = trained.export("fp32")
    cases = read_eval(onnx / "eval.jsonl")
    engine, chat = Engine.load(onnx), ChatTemplate.load(onnx)
    tok = AutoTokenizer.from_pretrained(onnx)
    texts = [tok.apply_chat_template(list(c.messages), tokenize=False, add_generation_prompt=True) for c in cases]
    chat_ids = [chat.encode(list(c.messages), engine.tokenizer) for c in cases]
    assert [ids[1:] for ids in map(engine.encode, texts)] == chat_ids  # the same prompt, less the <s>
    params = SamplingParams(max_tokens=8)
    local = {"chat": [c.text for c in engine.generate(chat_ids, params)],
             "text": [c.text for c in engine.generate(texts, params)]}
    for replies in local.values():
        assert score(cases, replies).accuracy >= MIN_ACCURACY, replies
    write_version(onnx, tmp_path / "repo", ModelOptions(name="numbers", threads=1))
    with TritonServer(tmp_path / "repo", ready_timeout=120) as server:
        for url, protocol in ((server.grpc_url, "grpc"), (server.http_url, "http")):
            with Client(url, protocol=protocol, model="numbers") as client:
                served = {"chat": [client.generate(list(c.messages), max_tokens=8).text for c in cases],
                          "text": [client.generate(t, max_tokens=8).text for t in texts]}
            assert served == local, protocol


def test_second_adapter_learns_roman_numerals_on_the_same_base(trained, trained_roman):
    """`demo-model --second-task roman`: a second LoRA adapter on the SAME base learns Roman numerals, which
    the base never saw, and answers held-out numbers it was not trained on (greedy, transformers' own
    generate on the merged model); its eval set travels inside the adapter folder."""
    from loraship.export.demo_task import read_task_report
    from loraship.export.evalset import is_correct
    from loraship.export.merge import merge

    report = read_task_report(trained_roman)
    held, train = read_eval(trained_roman / "eval.jsonl"), read_eval(trained_roman / "train.jsonl")
    assert report["task"] == "roman" and report["eval_cases"] == len(held) == 24 and report["train_cases"] == len(train)
    assert report["base_accuracy"] == 0.0 and report["merged_accuracy"] >= ROMAN_MIN_ACCURACY
    assert all(re.fullmatch(r"[IVXLC]+", c.answer) and "Roman numerals" in c.question for c in held)
    assert {_numbers(c.question).pop() for c in held}.isdisjoint({_numbers(c.question).pop() for c in train})
    config = json.loads((trained_roman / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((trained.demo / "base").resolve())
    merged = merge(trained.demo / "base", trained_roman, trained.root / "merged-roman")
    replies = _greedy_replies(merged, held, with_bos=False)
    assert sum(is_correct(r, a) for r, a in replies) == round(report["merged_accuracy"] * len(held)), replies
    assert all(re.fullmatch(r"[IVXLC]+", r.strip()) for r, _ in replies), replies  # numerals, never words


def test_second_task_refusals_are_one_line(trained, merged_dir, tmp_path, run_cli):
    for args, message in (
            (["--out", str(tmp_path / "a"), "--random", "--second-task", "roman"], "--second-task trains an adapter"),
            (["--out", str(tmp_path / "b"), "--base", str(trained.demo / "base")], "--base trains a second task's adapter"),
            (["--out", str(tmp_path / "c"), "--base", str(merged_dir), "--second-task", "roman"], "is not a trained demo-model base"),
            (["--out", str(tmp_path / "d"), "--base", str(tmp_path / "none"), "--second-task", "roman"], "no demo base model in")):
        code, _, err = run_cli(["demo-model", *args])
        assert code == 1 and message in err and len(err.strip().splitlines()) == 1, (args, err)
    assert list(tmp_path.iterdir()) == []
