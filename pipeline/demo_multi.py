"""`loraship demo --multi`: two fine-tunes of one base served by ONE endpoint, each answering its own task
when a request names it (the OpenAI ``model``).

demo-model (trained, as `loraship demo`: reused when an earlier demo in the same folder trained it) -> a
second adapter on the same base (numbers in Roman numerals, `demo-model --second-task roman`) -> the
multi-adapter build (``pipeline.multi``, in OUT/multi: the base with LoRA slots, both adapters converted,
merged and verified through the multi-adapter engine, the repository with both installed) -> serve (Triton
behind the OpenAI frontend) -> each adapter's held-out questions asked by its name through the OpenAI API.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loraship.pipeline.demo import DEMO_MODEL, DEMO_QUESTIONS, demo_model_step, pick_questions
from loraship.pipeline.runner import Pipeline, Record, tree_state

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

SECOND_TASK = "roman"
#: adapter name (the OpenAI ``model``) -> what it was fine-tuned to do
TASKS = {"words": "numbers in words", SECOND_TASK: "numbers in Roman numerals"}
MULTI_DIR = "multi"  # OUT/multi: the multi-adapter build's own work folder (OUT keeps the one-adapter demo's)


@dataclass(frozen=True)
class MultiAnswer:
    """A held-out question asked by adapter name through the OpenAI API, and the reply."""

    adapter: str
    question: str
    expected: str
    reply: str
    correct: bool
    seconds: float


@dataclass(frozen=True)
class MultiDemoResult:
    """What `demo --multi` prints: each adapter's verify figures and eval accuracy, and the answers."""

    out: Path
    url: str
    verified: dict[str, dict]  # name -> the verify step's figures (max_abs_logit_diff, token_agreement, eval_*)
    answers: list[MultiAnswer]


def second_adapter_step(p: Pipeline, seed: int = 0) -> Path:
    """The Roman-numerals adapter trained on OUT/model/base into OUT/adapter-roman (outside OUT/model, so
    the first demo-model step stays as it was)."""
    out = p.path(f"adapter-{SECOND_TASK}")

    def run() -> Record:
        from loraship.export.demo_task import read_task_report, task_adapter

        task_adapter(p.path("model") / "base", out, SECOND_TASK, seed=seed, force=True, console=p.console)
        made = read_task_report(out)
        n = made["eval_cases"]
        return {"detail": f"{SECOND_TASK} trained in {made['seconds']:.0f}s: held-out questions "
                          f"{round(made['base_accuracy'] * n)}/{n} by the base, {round(made['merged_accuracy'] * n)}/{n} fine-tuned"}

    p.step(f"demo-model {SECOND_TASK}", f"fine-tuning a second adapter on the same base: {TASKS[SECOND_TASK]} "
           f"(demo-model --second-task {SECOND_TASK})", ["task-adapter", SECOND_TASK, seed, tree_state(p.path("model") / "base")],
           run, output=lambda r: tree_state(out), spinner=False)
    return out


def run_demo_multi(out: Path, force: bool = False, arch: str = "phi3", size: str = "tiny", questions: int = DEMO_QUESTIONS,
                   max_tokens: int = 16, console: Console | None = None) -> tuple[MultiDemoResult, Pipeline]:
    """Train (or reuse) both adapters, ship them on one base, and ask each adapter its held-out questions by
    name through one OpenAI endpoint; the figures and the multi-adapter build's pipeline (its summary)."""
    from rich.console import Console
    from rich.markup import escape

    from loraship.export.evalset import EVAL_FILE, is_correct, read_eval
    from loraship.pipeline.local import chat
    from loraship.pipeline.multi import build_multi
    from loraship.triton_repo.config import ModelOptions
    from loraship.triton_repo.serve import ServeOptions

    console = console or Console()
    p = Pipeline(out, console, force)
    demo_model_step(p, arch, size)
    roman = second_adapter_step(p)
    q = Pipeline(p.path(MULTI_DIR), console, force)
    q.records = p.records  # one summary for both
    converted = build_multi(q, p.path("model") / "base", {"words": p.path("model") / "adapter", SECOND_TASK: roman},
                            ModelOptions(name=DEMO_MODEL))
    start = time.perf_counter()
    with console.status("starting tritonserver and the OpenAI frontend (serve)..."):
        server = ServeOptions().server(q.path("repo")).start()
    q.note("serve", f"{server.openai_url} (OpenAI), models {DEMO_MODEL} (the base), {', '.join(converted)}",
           time.perf_counter() - start)
    answers = []
    try:
        console.print(f"One endpoint, {server.openai_url}: each adapter answers its own held-out questions when the "
                      "request names it (\"model\"):", highlight=False)
        for name, folder in converted.items():
            for case in pick_questions(read_eval(folder / EVAL_FILE), questions):
                done = chat(server.openai_url, name, list(case.messages), max_tokens)
                ok = is_correct(done.text, case.answer)
                console.print(f"[dim]model:[/] [bold]{escape(name)}[/] [dim]question:[/] {escape(case.question)}  "
                              f"[dim]reply:[/] {escape(done.text.strip())}  [dim]expected:[/] {escape(case.answer)} "
                              + ("[green]\u2713[/]" if ok else "[red]\u2717[/]"), highlight=False)
                answers.append(MultiAnswer(name, case.question, case.answer, done.text, ok, done.seconds))
    finally:
        server.stop()
    return MultiDemoResult(q.work, server.openai_url, q.state["verify"]["adapters"], answers), q


def multi_summary(result: MultiDemoResult) -> Table:
    """Per adapter: its task, parity through the multi-adapter engine, eval accuracy, and the answers by name."""
    from rich.table import Table

    table = Table(title="loraship demo --multi: one base, one endpoint, an adapter per task")
    for col in ("model (adapter)", "task", "parity vs its merged model", "eval set through the engine", "answers by name"):
        table.add_column(col)
    for name, figures in result.verified.items():
        asked = [a for a in result.answers if a.adapter == name]
        evaluated = f"{figures['eval_correct']}/{figures['eval_cases']}" if "eval_cases" in figures else "no eval set"
        table.add_row(name, TASKS.get(name, ""), f"max |logit diff| {figures['max_abs_logit_diff']:.1e}, "
                      f"tokens {figures['token_agreement']:.0%} identical", evaluated,
                      f"{sum(a.correct for a in asked)}/{len(asked)} correct")
    table.caption = f"serve again: loraship serve --repo {result.out}/repo"
    return table
