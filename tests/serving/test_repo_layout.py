"""`loraship repo`: config.pbtxt parsed back with Triton's protobuf, versions, errors."""

from __future__ import annotations

import json
import os
import shutil

from click.testing import CliRunner

from loraship.cli.main import cli
from loraship.triton_repo.config import read_config
from loraship.triton_repo.layout import versions


def run(*args):
    return CliRunner().invoke(cli, list(args))


def test_repo_writes_decoupled_python_model_with_engine_parameters(onnx_dir, tmp_path):
    from tritonclient.grpc import model_config_pb2 as mc

    result = run("repo", "--onnx", str(onnx_dir), "--out", str(tmp_path / "repo"), "--name", "m",
                 "--instances", "2", "--max-batch-size", "4", "--max-context", "256", "--max-tokens", "32", "--hang-timeout", "45")
    assert result.exit_code == 0, result.output
    manifest = json.loads((onnx_dir / "loraship.json").read_text())
    row_kib = 2 * manifest["num_layers"] * manifest["kv_heads"] * manifest["head_dim"] * 4 * 256 / 1024
    assert row_kib == 256  # tiny phi3: 2 layers x K,V x 2 KV heads x 32 dims x fp32 x 256 positions
    assert "each instance allocates its KV cache: 4 rows x 256 positions (float32), 0.2 MiB a row, 1.0 MiB in all " \
           "at load" in " ".join(result.output.split())
    cfg = read_config(tmp_path / "repo" / "m" / "config.pbtxt")
    assert (cfg.name, cfg.backend, cfg.max_batch_size) == ("m", "python", 0)
    assert cfg.model_transaction_policy.decoupled
    assert cfg.version_policy.latest.num_versions == 1
    assert [(g.count, g.kind) for g in cfg.instance_group] == [(2, mc.ModelInstanceGroup.KIND_CPU)]
    inputs = {i.name: (mc.DataType.Name(i.data_type), list(i.dims), i.optional) for i in cfg.input}
    assert inputs["text_input"] == ("TYPE_STRING", [1], True)  # or messages: the model checks that one is sent
    assert inputs["messages"] == ("TYPE_STRING", [1], True)
    assert inputs["max_tokens"] == ("TYPE_INT32", [1], True)
    assert inputs["stream"] == ("TYPE_BOOL", [1], True)
    assert inputs["stop"] == ("TYPE_STRING", [-1], True)
    # TensorRT-LLM's ensemble and vLLM's backend names, with their types
    assert inputs["exclude_input_in_output"] == ("TYPE_BOOL", [1], True)
    assert inputs["random_seed"] == ("TYPE_UINT64", [1], True) and inputs["min_length"] == ("TYPE_INT32", [1], True)
    assert inputs["stop_words"] == ("TYPE_STRING", [-1], True) and inputs["sampling_parameters"] == ("TYPE_STRING", [1], True)
    outputs = {o.name: mc.DataType.Name(o.data_type) for o in cfg.output}
    assert inputs["input_ids"] == ("TYPE_INT32", [-1], True)
    assert inputs["logprobs"] == inputs["prompt_logprobs"] == ("TYPE_INT32", [1], True)
    assert outputs == {"text_output": "TYPE_STRING", "prompt_tokens": "TYPE_INT32", "completion_tokens": "TYPE_INT32",
                       "finish_reason": "TYPE_STRING", "num_input_tokens": "TYPE_UINT32", "num_output_tokens": "TYPE_UINT32",
                       "logprobs": "TYPE_STRING", "prompt_logprobs": "TYPE_STRING"}
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert params == {"provider": "cpu", "max_batch": "4", "max_context": "256", "default_max_tokens": "32",
                      "onnx_dir": "onnx", "trt_fp16": "0", "chat_template": "1", "context": "256", "hang_timeout": "45"}
    version = tmp_path / "repo" / "m" / "1"
    assert sorted(os.listdir(version)) == ["loraship_contract.py", "loraship_engine", "loraship_inputs.py", "model.py", "onnx"]
    assert (version / "loraship_engine" / "scheduler.py").is_file()
    assert not list(version.rglob("__pycache__"))
    assert sorted(os.listdir(version / "onnx")) == sorted(os.listdir(onnx_dir))


def test_gpu_providers_run_as_kind_gpu_and_versions_increment(onnx_dir, tmp_path):
    from tritonclient.grpc import model_config_pb2 as mc

    out = tmp_path / "repo"
    assert run("repo", "--onnx", str(onnx_dir), "--out", str(out), "--name", "m").exit_code == 0
    before = (out / "m" / "1" / "model.py").stat().st_mtime_ns
    result = run("repo", "--onnx", str(onnx_dir), "--out", str(out), "--name", "m", "--provider", "tensorrt",
                 "--fp16", "--trt-cache-dir", "/cache/trt")
    assert result.exit_code == 0, result.output
    cfg = read_config(out / "m" / "config.pbtxt")
    assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert (params["provider"], params["trt_fp16"], params["trt_cache_dir"]) == ("tensorrt", "1", "/cache/trt")
    assert params["context"] == str(json.loads((onnx_dir / "loraship.json").read_text())["max_context"])  # the export's, uncapped
    assert versions(out / "m") == [1, 2]
    assert (out / "m" / "1" / "model.py").stat().st_mtime_ns == before  # the old version is untouched
    assert not [p for p in (out / "m").iterdir() if p.name.startswith(".")]  # no temp dirs left
    # --cuda-graph takes a genai export (the default export: KV rows planned at load)
    assert run("repo", "--onnx", str(onnx_dir), "--out", str(out), "--name", "m", "--provider", "cuda", "--cuda-graph",
               "--max-batch-size", "32", "--kv-budget-gb", "40").exit_code == 0
    params = {k: v.string_value for k, v in read_config(out / "m" / "config.pbtxt").parameters.items()}
    assert (params["provider"], params["cuda_graph"], params["max_batch"], params["kv_budget_gb"]) == ("cuda", "1", "32", "40.0")
    assert versions(out / "m") == [2, 3]  # --keep 2 pruned version 1


def test_bad_repo_options_give_one_line_errors(onnx_dir, tmp_path, capsys):
    import pytest

    from loraship.cli.main import main

    optimum = tmp_path / "optimum"  # an export whose decoder grows its KV cache
    shutil.copytree(onnx_dir, optimum)
    manifest = json.loads((optimum / "loraship.json").read_text())
    (optimum / "loraship.json").write_text(json.dumps({**manifest, "engine": "optimum", "kv_cache": "grown"}))
    cases = [
        (["--name", "m", "--onnx", str(tmp_path / "missing")], "has no loraship.json"),
        (["--name", "m", "--onnx", str(onnx_dir), "--keep", "1"], "--keep"),
        (["--name", "m", "--onnx", str(onnx_dir), "--fp16"], "--provider tensorrt"),
        (["--name", "m", "--onnx", str(onnx_dir), "--max-context", "999999"], "exceeds the model's context"),
        (["--name", "bad name", "--onnx", str(onnx_dir)], "is not valid"),
        # what Triton, the filesystem and Azure Files all accept (a non-ASCII name stopped the whole server
        # from starting; a dot-name served locally but `azure upload` skipped it)
        *[(["--name", bad, "--onnx", str(onnx_dir)],
           f"model name {bad!r} is not valid (use 1-128 ASCII letters, digits, '_' or '-', not starting with '-' or '.')")
          for bad in ("модель", ".hidden", "-x", "phi3.5", "a/b", "x" * 129)],
        (["--name", "m", "--onnx", str(onnx_dir), "--hang-timeout", "-1"], "--hang-timeout -1.0 is not a number of seconds"),
        (["--name", "m", "--onnx", str(onnx_dir), "--hang-timeout", "nan"], "--hang-timeout nan is not a number of seconds"),
        (["--name", "m", "--onnx", str(onnx_dir), "--cuda-graph"], "add --provider cuda"),
        (["--name", "m", "--onnx", str(optimum), "--provider", "cuda", "--cuda-graph"], "--target cuda"),
        (["--name", "m", "--onnx", str(onnx_dir), "--kv-budget-gb", "0"], "--kv-budget-gb 0.0 is not positive"),
        (["--name", "m", "--onnx", str(onnx_dir), "--kv-budget-gb", "0.0001"], "holds no row of 2048 positions"),
        (["--name", "m", "--onnx", str(onnx_dir), "--stage-wheels", "--image-tag", "24.05"], "has no Python 3.12"),
        (["--name", "m", "--onnx", str(onnx_dir), "--image-tag", "25.10"], "--image-tag only picks the staged wheels"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["repo", "--out", str(tmp_path / "repo"), *extra])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 1 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").rglob("model.py"))


def test_a_kv_budget_below_the_batch_sets_the_batch(onnx_dir, tmp_path):
    """A budget that holds 2 rows of 2048 positions (2 MiB each, tiny fp32) serves 2 requests at once, and
    config.pbtxt says so (ACA's scale rule reads it)."""
    result = run("repo", "--onnx", str(onnx_dir), "--out", str(tmp_path / "repo"), "--name", "m",
                 "--max-batch-size", "8", "--kv-budget-gb", str(5 / 1024))
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "KV cache: 2 rows x 2048 positions (float32), 2.0 MiB a row, 4.0 MiB in all" in text
    assert "in-flight batch 2: the rows --kv-budget-gb holds (--max-batch-size 8)" in text
    params = {k: v.string_value for k, v in read_config(tmp_path / "repo" / "m" / "config.pbtxt").parameters.items()}
    assert params["max_batch"] == "2"


def test_fit_to_gpu_takes_cuda_graphs_and_a_kv_budget(onnx_dir):
    from loraship.errors import LorashipError
    from loraship.pipeline.build import GPU_HEADROOM_GIB, fit_to_gpu
    from loraship.triton_repo.config import ModelOptions

    cpu = ModelOptions(name="m")
    assert fit_to_gpu(cpu, onnx_dir, 16.0) == cpu  # nothing changes for the CPU
    manifest = json.loads((onnx_dir / "loraship.json").read_text())
    weights = sum(e["size"] for name, e in manifest["files"].items() if name.startswith("model.onnx")) / 2**30
    fitted = fit_to_gpu(ModelOptions(name="m", provider="cuda", instances=2), onnx_dir, 16.0)
    assert fitted.cuda_graph and fitted.kv_budget_gb == round(8 - 1.1 * weights - GPU_HEADROOM_GIB, 2)
    mine = ModelOptions(name="m", provider="cuda", kv_budget_gb=3.0)
    assert fit_to_gpu(mine, onnx_dir, 16.0).kv_budget_gb == 3.0  # the user's budget stays
    assert fit_to_gpu(mine, onnx_dir, None).kv_budget_gb == 3.0
    import pytest

    with pytest.raises(LorashipError, match="holds 1 instance"):
        fit_to_gpu(ModelOptions(name="m", provider="cuda"), onnx_dir, 1.0)
