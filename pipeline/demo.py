"""`loraship demo`: demo-model (trained) -> merge -> export -> verify -> repo -> serve -> three held-out
questions asked as chats, streamed, and a summary of the figures."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loraship.pipeline.build import build
from loraship.pipeline.local import stream_reply
from loraship.pipeline.runner import Pipeline, Record, tree_state

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from loraship.export.evalset import EvalCase

DEMO_MODEL = "demo"
DEMO_QUESTIONS = 3


@dataclass(frozen=True)
class Answer:
    """A held-out question asked through Triton, the reply, and the answer it should start with."""

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


def pick_questions(cases: list[EvalCase], n: int = DEMO_QUESTIONS) -> list[EvalCase]:
    """``n`` cases spread over an eval set (first, middle and last for three)."""
    return [cases[round(i * (len(cases) - 1) / max(n - 1, 1))] for i in range(min(n, len(cases)))]


def ask_questions(url: str, protocol: str, model: str, cases: list[EvalCase], max_tokens: int,
                  console: Console) -> list[Answer]:
    """Ask each eval case as a chat (``messages``: the server applies the chat template), streaming each
    reply beside the answer it should start with."""
    from rich.markup import escape

    from loraship.client.client import Client
    from loraship.export.evalset import is_correct

    answers = []
    with Client(url, protocol=protocol, model=model) as client:
        for case in cases:
            console.print(f"[dim]question:[/] {escape(case.question)}\n[dim]reply:[/]    ", end="", highlight=False)
            done = stream_reply(client, list(case.messages), max_tokens, console)
            ok = is_correct(done.text, case.answer)
            verdict = "[green]\u2713 correct[/]" if ok else "[red]\u2717 wrong[/]"
            console.print(f"   [dim]expected:[/] {escape(case.answer)}  {verdict}", highlight=False)
            answers.append(Answer(case.question, case.answer, done.text, ok, done.prompt_tokens, done.completion_tokens,
                                  done.ttft_s, done.total_s))
    return answers


def demo_model_step(p: Pipeline, arch: str = "phi3", size: str = "tiny") -> Record:
    """The trained demo model in OUT/model: a base and an adapter that writes numbers in words (demo-model)."""
    def demo_model() -> Record:
        from loraship.export.demo_model import demo_model, read_report

        demo_model(p.path("model"), arch=arch, size=size, force=True, console=p.console)
        made = read_report(p.path("model"))
        n = made["eval_cases"]
        return {"detail": f"{size} {arch} trained: held-out questions {round(made['base_accuracy'] * n)}/{n} by the base, "
                          f"{round(made['merged_accuracy'] * n)}/{n} fine-tuned"}

    return p.step("demo-model", f"training a {size} {arch} base and a LoRA fine-tune that writes numbers in words (demo-model)",
                  ["demo-model", arch, size], demo_model, output=lambda r: tree_state(p.path("model")), spinner=False)


def run_demo(out: Path, arch: str = "phi3", size: str = "tiny", force: bool = False, max_tokens: int = 48,
             protocol: str = "grpc", console: Console | None = None) -> tuple[DemoResult, Pipeline]:
    """demo-model (trained) -> merge -> export -> verify -> repo -> serve -> three held-out questions, streamed."""
    from rich.console import Console

    from loraship.export.evalset import EVAL_FILE, read_eval
    from loraship.triton_repo.config import ModelOptions
    from loraship.triton_repo.server import TritonServer

    console = console or Console()
    p = Pipeline(out, console, force)
    demo_model_step(p, arch, size)
    build(p, p.path("model") / "base", p.path("model") / "adapter", ModelOptions(name=DEMO_MODEL))
    start = time.perf_counter()
    with console.status("starting tritonserver (serve)..."):
        server = TritonServer(p.path("repo")).start()
    p.note("serve", f"{server.http_url} (HTTP), {server.grpc_url} (gRPC)", time.perf_counter() - start)
    try:
        console.print(f"[bold]{DEMO_MODEL}[/] at {server.http_url} (HTTP) and {server.grpc_url} (gRPC); "
                      f"{DEMO_QUESTIONS} held-out questions as chats:")
        answers = ask_questions(server.grpc_url if protocol == "grpc" else server.http_url, protocol, DEMO_MODEL,
                                pick_questions(read_eval(p.path("onnx") / EVAL_FILE)), max_tokens, console)
    finally:
        server.stop()
    verified = p.state["verify"]
    return DemoResult(p.work, verified["max_abs_logit_diff"], verified["token_agreement"], verified["eval_correct"],
                      verified["eval_cases"], answers), p


def demo_summary(result: DemoResult) -> Table:
    from rich.table import Table

    table = Table(title="loraship demo", show_header=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    table.add_row("parity: max |logit diff|", f"{result.max_abs_logit_diff:.2e} (ONNX Runtime vs PyTorch)")
    table.add_row("parity: greedy tokens", f"{result.token_agreement:.0%} identical")
    table.add_row("eval set through the engine", f"{result.eval_correct}/{result.eval_cases} held-out questions correct")
    table.add_row("fine-tune answers correct through Triton", f"{result.correct}/{len(result.answers)}")
    table.add_row("tokens", f"{sum(a.prompt_tokens for a in result.answers)} prompt, "
                            f"{sum(a.completion_tokens for a in result.answers)} generated")
    table.add_row("time to first token", f"{result.ttft_s * 1000:.1f} ms (mean)")
    table.add_row("decode speed", f"{result.decode_tokens_per_s:.0f} tokens/s")
    table.add_row("end to end", f"{sum(a.total_s for a in result.answers) * 1000:.0f} ms for {len(result.answers)} replies")
    table.add_row("serve again", f"loraship serve --repo {result.out}/repo")
    return table
