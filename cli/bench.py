"""`loraship bench`: latency and throughput of a Triton endpoint, checked against Triton's /metrics."""

from __future__ import annotations

from pathlib import Path

import click

from loraship.cli.generate import endpoint_options, make_client


def _levels(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    try:
        levels = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers, e.g. 1,2,4,8") from None
    if not levels or min(levels) < 1:
        raise click.BadParameter("needs positive integers, e.g. 1,2,4,8")
    return levels


@click.command(epilog="""\b
Example:
  loraship serve --repo work/repo --http-port 8000 --grpc-port 8001 --metrics-port 8002 &
  loraship bench --url 127.0.0.1:8001 --concurrency 1,2,4,8 --requests 64 \\
      --prompt-tokens 128 --max-tokens 64 --metrics-url http://127.0.0.1:8002/metrics --out bench-out
""")
@endpoint_options
@click.option("--concurrency", default="1,2,4,8", show_default=True, callback=_levels, help="Comma-separated concurrency levels.")
@click.option("--requests", type=int, help="Requests per level (default 32 unless --duration is given).")
@click.option("--duration", type=float, help="Seconds per level, instead of --requests.")
@click.option("--prompt-tokens", default=128, show_default=True, help="Length of the synthetic prompts, in the server's tokens.")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path, exists=True, dir_okay=False), help='JSONL file of {"prompt": ...} lines instead of synthetic prompts.')
@click.option("--chat", is_flag=True, help="Send each prompt as a user message in the model's chat template (prompt tokens then include the template's).")
@click.option("--max-tokens", default=64, show_default=True, help="Tokens to generate per request (greedy).")
@click.option("--ignore-eos/--stop-at-eos", default=True, show_default=True,
              help="Generate exactly --max-tokens even where the model would end its reply earlier.")
@click.option("--warmup", default=2, show_default=True, help="Warm-up requests before measuring.")
@click.option("--metrics-url", help="Triton's metrics endpoint, e.g. http://127.0.0.1:8002/metrics, to check the figures against the server's.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench-out"), show_default=True, help="Directory for bench.json, bench.csv and bench.png.")
@click.option("--force", is_flag=True, help="Replace a non-empty --out.")
def bench(url: str | None, protocol: str | None, model: str | None, api_key: str | None, timeout: float, concurrency: list[int], requests: int | None,
          duration: float | None, prompt_tokens: int, prompts_file: Path | None, chat: bool, max_tokens: int, ignore_eos: bool,
          warmup: int, metrics_url: str | None, out: Path, force: bool) -> None:
    """Measure TTFT, inter-token and end-to-end latency and throughput at each concurrency level."""
    from rich.console import Console

    from loraship.client.bench import load_prompts, per_level, run_bench
    from loraship.client.bench_report import render_table, verdict, write_outputs
    from loraship.fsutil import check_out_dir

    requests, duration = per_level(requests, duration)
    check_out_dir(out, force)  # fail before the run, not after it
    console = Console(stderr=True)
    prompts = load_prompts(prompts_file) if prompts_file else None
    with make_client(url, protocol, model, api_key, timeout) as client:
        report = run_bench(client, concurrency, max_tokens=max_tokens, requests=requests, duration_s=duration, prompt_tokens=prompt_tokens,
                           prompts=prompts, warmup=warmup, metrics_url=metrics_url, console=console, chat=chat, ignore_eos=ignore_eos)
    stdout = Console()
    if not stdout.is_terminal:  # piped or logged: keep the whole table on one line per level
        stdout = Console(width=max(stdout.width, 170))
    stdout.print(render_table(report))
    write_outputs(report, out, force=force)
    console.print(f"wrote {out}/bench.json, bench.csv, bench.png")
    judged = verdict(report)
    for note in judged.notes:
        console.print(note)
    if judged.error is not None:
        raise judged.error
