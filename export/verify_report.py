"""`loraship verify`'s report as the terminal shows it: the parity table, the eval set's table, the verdict."""

from __future__ import annotations

from typing import TYPE_CHECKING

from loraship.export.verify import Report, bound_text

if TYPE_CHECKING:
    from rich.console import RenderableType
    from rich.table import Table


def parity_table(report: Report) -> Table:
    """Each compared batch of prompts with its max |logit diff| and each sequence's token agreement."""
    from rich.table import Table

    table = Table(title=f"parity: {report.engine} {report.dtype} vs PyTorch ({', '.join(report.providers)})")
    for col in ("batch", "prompt", "max |logit diff|", "token agreement"):
        table.add_column(col)
    for case in report.cases:
        table.add_row(str(len(case.prompts)), " | ".join(p[:32] for p in case.prompts),
                      f"{case.max_abs_logit_diff:.3g}", " ".join(f"{a:.0%}" for a in case.token_agreement))
    return table


def eval_table(report: Report) -> Table:
    """Each eval question with the expected answer and both sides' replies."""
    from rich.markup import escape
    from rich.table import Table

    ev = report.eval
    assert ev is not None
    n = len(ev.engine.replies)
    table = Table(title=f"eval set {ev.file}: engine {report.engine} {report.dtype} {sum(ev.engine.correct)}/{n} "
                        f"({ev.engine.accuracy:.1%}), PyTorch {sum(ev.torch.correct)}/{n} ({ev.torch.accuracy:.1%})")
    for col in ("question", "expected", "engine reply", "PyTorch reply"):
        table.add_column(col)

    def mark(ok: bool) -> str:
        return "[green]\u2713[/]" if ok else "[red]\u2717[/]"

    for q, a, er, ec, tr, tc in zip(ev.engine.questions, ev.engine.answers, ev.engine.replies, ev.engine.correct,
                                    ev.torch.replies, ev.torch.correct):
        table.add_row(escape(q[:48]), escape(a), f"{mark(ec)} {escape(er[:40])}", f"{mark(tc)} {escape(tr[:40])}")
    return table


def verdict(report: Report) -> list[str]:
    """PASS or FAIL with the figures and their bounds (rich markup), and the eval accuracies when there are any."""
    word = "[green]PASS[/]" if report.passed else "[red]FAIL[/]"
    lines = [f"{word} max logit diff {report.max_abs_logit_diff:.3g} (atol {bound_text(report.atol)}); "
             f"token agreement {report.token_agreement:.1%} over {report.max_new_tokens} tokens "
             f"(need {report.min_token_agreement:.0%})"]
    if report.eval is not None:
        need = "" if report.min_accuracy is None else f" (need {report.min_accuracy:.0%})"
        lines.append(f"eval accuracy through the engine {report.eval.engine.accuracy:.1%}{need}, "
                     f"PyTorch {report.eval.torch.accuracy:.1%}, same replies {report.eval.same_replies:.0%}")
    return lines


def render(report: Report) -> list[RenderableType]:
    """What `loraship verify` prints, in order: the parity table, the eval table (with an eval set), the verdict."""
    return [parity_table(report), *([eval_table(report)] if report.eval is not None else []), *verdict(report)]
