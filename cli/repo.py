"""`loraship repo`: lay out a Triton model repository for an exported model."""

from __future__ import annotations

from pathlib import Path

import click


@click.command(epilog="""\b
Example:
  loraship repo --onnx work/onnx --out work/repo --name phi3-lora
  loraship repo --onnx work/onnx --out gpu/repo --name phi3-lora --provider cuda --instances 2 --stage-wheels
  loraship repo --onnx work/onnx --out upload/repo --name phi3-lora --provider cuda --stage-wheels --image-tag 25.10
  loraship export --model work/merged --out work/genai-cuda --dtype fp16 --target cuda   # the export CUDA graphs need
  loraship repo --onnx work/genai-cuda --out graphs/repo --name phi3-lora --provider cuda --cuda-graph
  loraship repo --onnx work/genai-cuda --out graphs/repo --name phi3-lora --provider cuda --max-batch-size 32 --kv-budget-gb 40
  loraship repo --onnx work/base-slots --out work/repo --name phi3 --adapter sql=work/adapters/sql --adapter roman=work/adapters/roman
Each run adds a version; the newest serves, so keep GPU versions out of a repository a CPU serves.
""")
@click.option("--onnx", "onnx_dir", required=True, type=click.Path(path_type=Path), help="Output folder of `loraship export`.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Model repository (created if missing).")
@click.option("--name", required=True, help="Model name in the repository (the URL's /v2/models/NAME).")
@click.option("--instances", default=1, show_default=True, help="Model instances (each runs its own engine).")
@click.option("--max-batch-size", default=8, show_default=True,
              help="In-flight decode batch of each instance; more concurrent requests wait in its queue.")
@click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True,
              help="ONNX Runtime execution provider; cuda/tensorrt run as KIND_GPU.")
@click.option("--fp16", is_flag=True, help="TensorRT fp16 kernels (with --provider tensorrt).")
@click.option("--trt-cache-dir", help="TensorRT engine cache directory inside the server (default: in the version).")
@click.option("--trt-profile", help="TensorRT shape profile as min:opt:max context tokens.")
@click.option("--max-context", type=int, help="Refuse prompt + max_tokens beyond this (default: the model's context).")
@click.option("--max-tokens", "default_max_tokens", default=128, show_default=True,
              help="max_tokens for requests that do not send it.")
@click.option("--cuda-graph", is_flag=True,
              help="Replay decode steps as CUDA graphs (with --provider cuda, on an `--engine genai` export).")
@click.option("--kv-budget-gb", type=float,
              help="KV cache memory per instance (genai export): as many rows as fit, at most --max-batch-size.")
@click.option("--threads", type=int, help="ONNX Runtime threads per instance (default: all cores).")
@click.option("--hang-timeout", default=120.0, show_default=True,
              help="Seconds a model instance may have requests but finish no decode step before it ends itself, so "
                   "the server restarts it (0: off).")
@click.option("--keep", default=2, show_default=True, help="Versions kept on disk; the newest serves.")
@click.option("--stage-wheels", is_flag=True,
              help="Download what the NGC image lacks (onnxruntime-gpu, tokenizers, onnx, jinja2, the OpenAI frontend's "
                   "FastAPI stack) into a wheels/ folder beside --out, with start.sh and the supervisor and frontend it runs.")
@click.option("--image-tag", help="With --stage-wheels: the nvcr.io/nvidia/tritonserver:<TAG>-py3 release that will run "
                                  "them; its CUDA picks the onnxruntime-gpu build [default: 24.12].")
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=DIR",
              help="Serve a converted adapter (`loraship convert-adapter`) as model NAME, beside the base (an export with "
                   "LoRA slots: `loraship export --max-adapters N`); repeatable. Installed in the model's adapters/ folder.")
def repo(onnx_dir: Path, out: Path, name: str, instances: int, max_batch_size: int, provider: str, fp16: bool,
         trt_cache_dir: str | None, trt_profile: str | None, max_context: int | None, default_max_tokens: int,
         cuda_graph: bool, kv_budget_gb: float | None, threads: int | None, hang_timeout: float, keep: int, stage_wheels: bool,
         image_tag: str | None, adapters: tuple[str, ...]) -> None:
    """Write version N+1 of a streaming generate model (python backend, decoupled) into a Triton repository."""
    from loraship.triton_repo.adapters import parse_adapters
    from loraship.triton_repo.config import ModelOptions
    from loraship.triton_repo.release import release

    opts = ModelOptions(name=name, instances=instances, max_batch_size=max_batch_size, provider=provider, fp16=fp16,
                        trt_cache_dir=trt_cache_dir, trt_profile=trt_profile, max_context=max_context,
                        default_max_tokens=default_max_tokens, threads=threads, cuda_graph=cuda_graph,
                        kv_budget_gb=kv_budget_gb, hang_timeout=hang_timeout, keep=keep)
    done = release(onnx_dir, out, opts, stage_wheels=stage_wheels, image_tag=image_tag, adapters=parse_adapters(adapters))
    click.echo(str(done.version.version_dir))
