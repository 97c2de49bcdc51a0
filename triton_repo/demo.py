"""`loraship demo`: the whole path on a trained demo fine-tune, ending in answers streamed from a local Triton.

Each step calls the same library function as its command: demo-model, merge, export,
verify, repo, serve (``TritonServer``) and the client's ``Client.stream``. The served model is
asked three of the fine-tune's held-out questions as chats (the server renders them with the
model's chat template); each reply is printed beside the answer the fine-tune should give.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from loraship.errors import LorashipError

MODEL = "demo"
QUESTIONS = 3


@dataclass(frozen=True)
class Answer:
    """One held-out question asked through Triton, the reply, and the answer it should start with."""

    question: str
    expected: str
    reply: str
    correct: bool
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    total_s: float


@dataclass(frozen=True)
class DemoResult:
    """Figures the demo prints in its summary."""

    out: Path
    max_abs_logit_diff: float
    token_agreement: float
    parity_passed: bool
    eval_correct: int
    eval_cases: int
    answers: list[Answer]

    @property
    def correct(self) -> int:
        return sum(a.correct for a in self.answers)

    @property
    def ttft_s(self) -> float:
        return sum(a.ttft_s for a in self.answers) / len(self.answers)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second after each reply's first one (the streaming rate a user sees)."""
        tokens = sum(a.completion_tokens - 1 for a in self.answers)
        span = sum(a.total_s - a.ttft_s for a in self.answers)
        return tokens / span if tokens > 0 and span > 0 else 0.0


def pick_questions(cases: list, n: int = QUESTIONS) -> list:
    """``n`` cases spread over the eval set (first, middle, last for three)."""
    return [cases[round(i * (len(cases) - 1) / max(n - 1, 1))] for i in range(min(n, len(cases)))]


def ask(client, cases: list, max_tokens: int, console: Console) -> list[Answer]:
    """Stream each case's reply from the served model as a chat, printed beside the expected answer."""
    from rich.markup import escape

    from loraship.export.evalset import is_correct

    answers = []
    for case in cases:
        console.print(f"[dim]question:[/] {escape(case.question)}\n[dim]reply:[/]    ", end="", highlight=False)
        stream = client.stream(list(case.messages), max_tokens=max_tokens)
        for chunk in stream:
            console.print(chunk.text, end="", markup=False, highlight=False, soft_wrap=True)
        done = stream.completion
        ok = is_correct(done.text, case.answer)
        verdict = "[green]\u2713 correct[/]" if ok else "[red]\u2717 wrong[/]"
        console.print(f"   [dim]expected:[/] {escape(case.answer)}  {verdict}", highlight=False)
        answers.append(Answer(case.question, case.answer, done.text, ok, done.prompt_tokens, done.completion_tokens,
                              done.ttft_s, done.total_s))
    return answers


def run_demo(out: Path, arch: str = "phi3", size: str = "tiny", force: bool = False, max_tokens: int = 48,
             protocol: str = "grpc", console: Console | None = None) -> DemoResult:
    """demo-model -> merge -> export -> verify -> repo -> serve -> three held-out questions, streamed."""
    from loraship.client.client import Client
    from loraship.export.demo_model import demo_model
    from loraship.export.evalset import EVAL_FILE, read_eval
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
    console.print(f"training a {size} {arch} base and a LoRA fine-tune that writes numbers in words (demo-model)")
    demo_model(out / "model", arch=arch, size=size, console=console)
    with stage("merging the adapter (merge)"):
        merge(out / "model" / "base", out / "model" / "adapter", out / "merged")
    export_onnx(out / "merged", out / "onnx", console=console)
    with stage("checking ONNX Runtime against PyTorch and scoring the held-out questions (verify)"):
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
        console.print(f"[bold]{MODEL}[/] at {server.http_url} (HTTP) and {server.grpc_url} (gRPC); "
                      f"three held-out questions as chats:")
        with Client(url, protocol=protocol, model=MODEL) as client:
            answers = ask(client, pick_questions(read_eval(out / "onnx" / EVAL_FILE)), max_tokens, console)
    finally:
        server.stop()
    ev = report.eval
    return DemoResult(out, report.max_abs_logit_diff, report.token_agreement, report.passed, sum(ev.engine.correct),
                      len(ev.engine.correct), answers)


def summary_table(result: DemoResult) -> Table:
    table = Table(title="loraship demo", show_header=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    table.add_row("parity: max |logit diff|", f"{result.max_abs_logit_diff:.2e} (ONNX Runtime vs PyTorch)")
    table.add_row("parity: greedy tokens", f"{result.token_agreement:.0%} identical")
    table.add_row("eval set, engine in-process", f"{result.eval_correct}/{result.eval_cases} held-out questions correct")
    table.add_row("fine-tune answers correct through Triton", f"{result.correct}/{len(result.answers)}")
    table.add_row("tokens", f"{sum(a.prompt_tokens for a in result.answers)} prompt, "
                            f"{sum(a.completion_tokens for a in result.answers)} generated")
    table.add_row("time to first token", f"{result.ttft_s * 1000:.1f} ms (mean)")
    table.add_row("decode speed", f"{result.decode_tokens_per_s:.0f} tokens/s")
    table.add_row("end to end", f"{sum(a.total_s for a in result.answers) * 1000:.0f} ms for {len(result.answers)} replies")
    table.add_row("serve again", f"loraship serve --repo {result.out}/repo")
    return table
