"""The support matrix (``loraship.export.matrix``): every architecture of the zoo (tiny random-init models with
the features of public checkpoints, each with a LoRA adapter that changes its outputs) through the real merge,
the default export (builder, probe, fallback) and the loraship engine, compared with its unmerged PeftModel in
eager fp32. Built once per session; the other tests reuse its folders. The served test runs a real tritonserver."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from loraship.export import matrix

README = Path(__file__).resolve().parent.parent / "README.md"

# The engine export picks for each architecture, and why it is not the builder where it is not.
EXPECTED = {
    "Llama-3.2": ("genai", None), "Mistral": ("genai", None), "Qwen2.5": ("genai", None), "Qwen3": ("genai", None),
    "Gemma": ("genai", None),
    "Gemma-2": ("optimum", "the onnxruntime-genai export of Gemma2ForCausalLM fails the parity probe: max logit diff"),
    "Gemma-3": ("genai", None), "Phi-3-mini-4k": ("genai", None), "Phi-3.5-mini (longrope)": ("genai", None),
    "Phi-4-mini": ("genai", None), "Phi-2": ("genai", None), "Granite-3": ("genai", None), "Nemotron": ("genai", None),
    "OLMo": ("optimum", "the onnxruntime-genai export of OlmoForCausalLM fails the parity probe: max logit diff"),
    "SmolLM3": ("optimum", "the onnxruntime-genai export of SmolLM3ForCausalLM fails to build (KeyError: 'position_ids')"),
    "ERNIE-4.5": ("genai", None), "HunYuan-dense": ("genai", None), "LFM2": ("genai", None), "gpt-oss": ("genai", None),
    "GPT-2": ("optimum", "onnxruntime-genai's builder does not build GPT2LMHeadModel"),
    **{name: ("optimum", f"onnxruntime-genai's builder does not build {arch}") for name, arch in (
        ("GPT-NeoX (Pythia)", "GPTNeoXForCausalLM"), ("GPT-J", "GPTJForCausalLM"), ("CodeGen", "CodeGenForCausalLM"),
        ("GPT-Neo", "GPTNeoForCausalLM"), ("GPT-BigCode (StarCoder)", "GPTBigCodeForCausalLM"), ("OPT", "OPTForCausalLM"))},
    "Bloom": (None, None),
    **{name: ("optimum", f"onnxruntime-genai's builder does not build {arch}") for name, arch in (
        ("MPT", "MptForCausalLM"), ("Falcon", "FalconForCausalLM"), ("StableLM-2", "StableLmForCausalLM"),
        ("Cohere (Command-R)", "CohereForCausalLM"), ("OLMo-2", "Olmo2ForCausalLM"), ("Qwen3-MoE", "Qwen3MoeForCausalLM"),
        ("Helium", "HeliumForCausalLM"), ("Arcee (AFM)", "ArceeForCausalLM"), ("GLM-4", "GlmForCausalLM"),
        ("DeepSeek-V3", "DeepseekV3ForCausalLM"))},
}
REFUSED = {"Bloom": 'Error: MERGED/config.json names no context length for bloom (add "max_position_embeddings": the '
                    'context the model was trained for, to config.json)'}
GEMMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else "
                  "m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
                  "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


@pytest.fixture(scope="session")
def rows(tmp_path_factory) -> dict[str, matrix.Row]:
    done = matrix.run(tmp_path_factory.mktemp("matrix"))
    print("\n" + matrix.table(done))
    return {r.name: r for r in done}


def test_every_architecture_equals_its_unmerged_peft_model(rows):
    """Greedy tokens identical and max |dlogit| < 1e-4 against the unmerged PeftModel (eager fp32), for every
    prompt alone, a left-padded batch and a prompt past the sliding window or longrope's original context;
    the engine export chose is the expected one, and a fallback says why in one line."""
    assert list(rows) == list(EXPECTED)
    for name, row in rows.items():
        assert row.passed, row.to_dict()
        if name in REFUSED:  # refused in one line, before anything is built
            assert row.engine is None and f"Error: {row.refusal}" == REFUSED[name], row.to_dict()
            continue
        assert row.refusal is None and row.tokens_identical and row.max_abs_logit_diff < matrix.ATOL, row.to_dict()
        engine, why = EXPECTED[name]
        assert row.engine == engine, row.to_dict()
        if why is None:
            assert row.notes == [], row.to_dict()
        else:
            assert len(row.notes) == 1 and row.notes[0].startswith(why) and "; exporting with optimum" in row.notes[0]
    past = {name: row.past for name, row in rows.items() if row.past}
    assert past == {"Mistral": "sliding window 16", "Gemma-2": "sliding window 16", "Gemma-3": "sliding window 16",
                    "Phi-3.5-mini (longrope)": "longrope's original context 64",
                    "Phi-4-mini": "longrope's original context 64", "gpt-oss": "sliding window 16",
                    "GPT-Neo": "sliding window 16"}
    assert "sliding window 16" in rows["Gemma-2"].notes[0]  # the builder's window bug shows only past the window


def test_readme_table_is_what_the_matrix_measures(rows):
    """README's support table (``benchmarks/support_matrix.py`` writes it) has a row per architecture with the
    engine, tokens and known limit measured here; its max |dlogit| is within the bound, as measured here."""
    written = matrix.readme_rows(README.read_text())
    measured = matrix.readme_rows(f"{matrix.START}\n{matrix.table(list(rows.values()))}\n{matrix.END}")
    assert list(written) == list(measured)
    for arch, cells in measured.items():
        features, engine, tokens, diff, limit = cells
        assert written[arch][:3] == [features, engine, tokens], arch
        assert written[arch][4].split(" max logit diff")[0] == limit.split(" max logit diff")[0], arch
        if diff != "—":
            assert float(written[arch][3]) < matrix.ATOL and float(diff) < matrix.ATOL, arch


def test_forced_builder_that_fails_the_probe_is_refused_and_writes_nothing(rows, tmp_path, run_cli):
    """--engine genai on Gemma-2: the builder's window is on the wrong layers; the probe past the window sees it,
    and export refuses in one line instead of writing the export."""
    out = tmp_path / "gemma2-genai"
    code, _, err = run_cli(["export", "--model", f"{rows['Gemma-2'].folder}/merged", "--out", str(out), "--engine", "genai"])
    last = err.strip().splitlines()[-1]
    assert code == 1 and last.startswith("Error: the onnxruntime-genai export of Gemma2ForCausalLM fails the parity probe: "
                                         "max logit diff") and "past the sliding window 16" in last
    assert not out.exists() and not list(tmp_path.glob(".gemma2-genai*"))


def test_forced_optimum_on_longrope_is_refused(rows, tmp_path, run_cli):
    """optimum traces longrope at one sequence length, so its graph keeps the short factors past the original
    context: --engine optimum on Phi-3.5 is refused by the probe past it, and nothing is written."""
    out = tmp_path / "phi35-optimum"
    code, _, err = run_cli(["export", "--model", f"{rows['Phi-3.5-mini (longrope)'].folder}/merged", "--out", str(out),
                            "--engine", "optimum"])
    last = err.strip().splitlines()[-1]
    assert code == 1 and last.startswith("Error: the optimum export of Phi3ForCausalLM fails the parity probe: max logit diff")
    assert "past the longrope's original context 64" in last and not out.exists()


def test_verify_fails_an_sdpa_traced_gemma2(rows, tmp_path, run_cli, monkeypatch):
    """The Gemma-2 export loraship made before: merge dropped the base's ``_attn_implementation: eager`` (as
    transformers' save does), optimum traced the model as loaded (sdpa, which drops soft-capping) and nothing
    probed it; verify, whose PyTorch side loaded it the same way, passed it. Now merge keeps the key, and verify's
    eager reference fails such an export."""
    from optimum.exporters.onnx import onnx_export_from_model
    from transformers import AutoModelForCausalLM

    from loraship.export import onnx_export

    kept = Path(rows["Gemma-2"].folder) / "merged"
    assert json.loads((kept / "config.json").read_text())["_attn_implementation"] == "eager"
    merged = tmp_path / "merged-before"
    shutil.copytree(kept, merged)
    config = json.loads((merged / "config.json").read_text())
    del config["_attn_implementation"]
    (merged / "config.json").write_text(json.dumps(config))
    loaded = []

    def old_export(model_dir, out, dtype):  # export/onnx_export.py before: the model as from_pretrained loads it
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        loaded.append(model.config._attn_implementation)
        onnx_export_from_model(model, out, task=onnx_export.TASK, do_validation=False, device="cpu")

    monkeypatch.setattr(onnx_export, "_export_optimum", old_export)
    monkeypatch.setattr(onnx_export, "_probe", lambda *args: None)
    out = tmp_path / "gemma2-sdpa"
    assert run_cli(["export", "--model", str(merged), "--out", str(out), "--engine", "optimum"])[0] == 0
    assert loaded == ["sdpa"]
    code, stdout, err = run_cli(["verify", "--merged", str(merged), "--onnx", str(out), "--json"])
    report = json.loads(stdout)
    assert code == 1 and not report["passed"] and report["max_abs_logit_diff"] > 1e-2, report["max_abs_logit_diff"]
    assert err.strip().splitlines()[-1].startswith("Error: parity check failed: max logit diff")


def test_gpt2_and_gpt_oss_merge_as_peft_does(rows):
    """GPT-2's Conv1D adapter (weights stored [in, out]) and gpt-oss's adapter on its MoE expert parameters
    (peft target_parameters: rank r x experts) pass merge's checks, and the merged weights are peft's merge."""
    import torch
    from safetensors.torch import load_file

    from loraship.export import zoo

    for name in ("GPT-2", "gpt-oss"):
        folder = Path(rows[name].folder)
        merged = load_file(folder / "merged" / "model.safetensors")
        built = zoo.build(zoo.by_name(name), folder / "again", _tokenizer(folder))
        expected = {k: v for k, v in built.reference.merge_and_unload().state_dict().items() if k in merged}
        assert expected and all(torch.equal(merged[k], v) for k, v in expected.items()), name
    adapter = json.loads((Path(rows["gpt-oss"].folder) / "adapter" / "adapter_config.json").read_text())
    assert adapter["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def test_lfm2_recurrent_state_rows(rows):
    """LFM2's conv state lives in a row per request beside the KV rows: two rows decoding together, and a third
    request joining a row another one left, each get the tokens they get alone (a reused row starts from zeros)."""
    from loraship.engine import Engine, SamplingParams
    from loraship.engine.kv_rows import LONG_PROMPT
    from loraship.export.verify import long_prompt

    engine = Engine.load(Path(rows["LFM2"].folder) / "onnx", max_batch=2, threads=1)
    assert engine.runner.layout.conv_names == ("past_conv.0", "past_conv.2") and engine.kv.rows == 2
    prompts = ["Hello, how are you today?", "Hi", "The quick brown fox jumps over the lazy dog"]
    params = [SamplingParams(max_tokens=n) for n in (6, 14, 10)]
    alone = [engine.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]
    assert [c.token_ids for c in engine.generate(prompts, params)] == alone
    assert [c.token_ids for c in engine.generate(prompts[::-1], params[::-1])] == alone[::-1]
    # a prompt past LONG_PROMPT beside a decoding row prefills whole: chunked, its parked row's dummy decodes would
    # advance its conv state (its tokens' log-probabilities then moved by ~3e-3)
    long = long_prompt(engine.encode, LONG_PROMPT + 40)
    params = [SamplingParams(max_tokens=8, logprobs=0), SamplingParams(max_tokens=14, logprobs=0)]
    alone = [engine.generate([p], sp)[0] for p, sp in zip((long, prompts[1]), params)]
    both = engine.generate([long, prompts[1]], params)
    for got, ref in zip(both, alone):
        assert got.token_ids == ref.token_ids
        assert max(abs(a.logprob - b.logprob) for a, b in zip(got.logprobs, ref.logprobs)) < 1e-5


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder / "base")


def test_served_through_triton_with_a_chat_template(rows, tmp_path):
    """Gemma-2 (optimum, soft-capping) with Gemma's chat template through ship's pipeline (merge, export,
    verify, repo), and LFM2 (genai, recurrent conv state) beside it in the same repository, served by a real
    tritonserver: chats over HTTP and gRPC get the engine's in-process replies."""
    from loraship.client import Client
    from loraship.engine import Engine, SamplingParams
    from loraship.engine.chat import ChatTemplate
    from loraship.pipeline.build import build
    from loraship.pipeline.runner import Pipeline
    from loraship.triton_repo.config import ModelOptions
    from loraship.triton_repo.layout import write_version
    from loraship.triton_repo.server import TritonServer

    gemma = Path(rows["Gemma-2"].folder)
    base = tmp_path / "gemma2-base"
    shutil.copytree(gemma / "base", base)
    config = json.loads((base / "tokenizer_config.json").read_text())
    (base / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": GEMMA_TEMPLATE}))
    (base / "chat_template.jinja").unlink(missing_ok=True)
    work = tmp_path / "ship"
    repo = build(Pipeline(work), base, gemma / "adapter", ModelOptions(name="gemma2", threads=1))
    assert json.loads((work / "onnx" / "loraship.json").read_text())["verify"]["passed"]
    write_version(Path(rows["LFM2"].folder) / "onnx", repo, ModelOptions(name="lfm2", threads=1))
    chats = [[{"role": "user", "content": "Write 26 in words."}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is LoRA?"}]]
    local = {}
    for model, onnx in (("gemma2", work / "onnx"), ("lfm2", Path(rows["LFM2"].folder) / "onnx")):
        engine, chat = Engine.load(onnx), ChatTemplate.load(onnx)
        ids = [chat.encode(c, engine.tokenizer) for c in chats]
        local[model] = [c.text for c in engine.generate(ids, SamplingParams(max_tokens=12))]
    assert "<start_of_turn>model\n" in ChatTemplate.load(work / "onnx").render(chats[0], add_generation_prompt=True)
    with TritonServer(repo, ready_timeout=120) as server:
        for url, protocol in ((server.http_url, "http"), (server.grpc_url, "grpc")):
            for model in ("gemma2", "lfm2"):
                with Client(url, protocol=protocol, model=model) as client:
                    served = [client.generate(c, max_tokens=12).text for c in chats]
                assert served == local[model], (protocol, model)
