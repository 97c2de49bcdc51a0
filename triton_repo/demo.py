"""`loraship demo`: the whole path on a synthetic model, ending in a streamed reply from a local Triton.

Each step calls the same library function as its command: demo-model, merge, export,
verify, repo, serve (``TritonServer``) and the client's ``Client.stream``.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from loraship.errors import LorashipError

MODEL = "demo"
PROMPT = "LoRA adds small low-rank matrices to the attention"


@dataclass(frozen=True)
class DemoResult:
    """Figures the demo prints in its summary."""

    out: Path
    max_abs_logit_diff: float
    token_agreement: float
    parity_passed: bool
    text: str
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    total_s: float

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second after the first one (the streaming rate a user sees)."""
        span = self.total_s - self.ttft_s
        return (self.completion_tokens - 1) / span if self.completion_tokens > 1 and span > 0 else 0.0


def run_demo(out: Path, arch: str = "phi3", size: str = "tiny", force: bool = False, max_tokens: int = 48,
             protocol: str = "grpc", console: Console | None = None) -> DemoResult:
    """demo-model -> merge -> export -> verify -> repo -> serve -> one streamed generate."""
    from loraship.client.client import Client
    from loraship.export.demo_model import demo_model
    from loraship.export.merge import merge
    from loraship.export.onnx_export import export_onnx
    from loraship.export.progress import Stages
    from loraship.export.verify import verify
    from loraship.fsutil import check_out_dir
    from loraship.triton_repo.config import ModelOptions
    from loraship.triton_repo.layout import write_version
    from loraship.triton_repo.server import TritonServer

    console = console or Console(stderr=True)
    out = Path(out)
    check_out_dir(out, force)
    if force and out.is_dir():
        for name in ("model", "merged", "onnx", "repo"):
            shutil.rmtree(out / name, ignore_errors=True)
    stage = Stages(console)
    with stage(f"building a {size} {arch} base model and LoRA adapter (demo-model)"):
        demo_model(out / "model", arch=arch, size=size)
    with stage("merging the adapter (merge)"):
        merge(out / "model" / "base", out / "model" / "adapter", out / "merged")
    export_onnx(out / "merged", out / "onnx", console=console)
    with stage("checking ONNX Runtime against PyTorch (verify)"):
        report = verify(out / "merged", out / "onnx")
    if not report.passed:
        raise LorashipError(f"parity check failed: max logit diff {report.max_abs_logit_diff:.3g}, "
                            f"token agreement {report.token_agreement:.0%}", f"inspect {out / 'onnx' / 'loraship.json'}")
    with stage("laying out the Triton model repository (repo)"):
        write_version(out / "onnx", out / "repo", ModelOptions(name=MODEL))
    with stage("starting tritonserver (serve)"):
        server = TritonServer(out / "repo").start()
    try:
        url = server.grpc_url if protocol == "grpc" else server.http_url
        console.print(f"[bold]{MODEL}[/] at {server.http_url} (HTTP) and {server.grpc_url} (gRPC)")
        console.print(f"[dim]prompt:[/] {PROMPT}\n[dim]reply:[/]  ", end="")
        stream = Client(url, protocol=protocol, model=MODEL).stream(PROMPT, max_tokens=max_tokens)
        for chunk in stream:
            console.print(chunk.text, end="", markup=False, highlight=False, soft_wrap=True)
        console.print()
        done = stream.completion
    finally:
        server.stop()
    return DemoResult(out, report.max_abs_logit_diff, report.token_agreement, report.passed, done.text,
                      done.prompt_tokens, done.completion_tokens, done.ttft_s, done.total_s)


def summary_table(result: DemoResult) -> Table:
    table = Table(title="loraship demo", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("parity: max |logit diff|", f"{result.max_abs_logit_diff:.2e} (ONNX Runtime vs PyTorch)")
    table.add_row("parity: greedy tokens", f"{result.token_agreement:.0%} identical")
    table.add_row("tokens", f"{result.prompt_tokens} prompt, {result.completion_tokens} generated")
    table.add_row("time to first token", f"{result.ttft_s * 1000:.1f} ms")
    table.add_row("decode speed", f"{result.decode_tokens_per_s:.0f} tokens/s")
    table.add_row("end to end", f"{result.total_s * 1000:.0f} ms")
    table.add_row("serve again", f"loraship serve --repo {result.out}/repo")
    return table
