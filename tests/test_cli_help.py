"""Every command's --help: each option described, examples that click's own parser accepts, azure
summaries in full, and --debug after the command name as well as before it."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import click
import click.testing
import pytest

from loraship.cli.main import COMMANDS, cli, main


def _commands() -> Iterator[tuple[str, click.Command]]:
    """(path, command) for the group, every command and every subcommand of a group."""
    ctx = click.Context(cli, info_name="loraship")
    yield "loraship", cli

    def walk(path: str, command: click.Command) -> Iterator[tuple[str, click.Command]]:
        yield path, command
        for name, sub in getattr(command, "commands", {}).items():
            yield from walk(f"{path} {name}", sub)

    for name in sorted(COMMANDS):
        yield from walk(f"loraship {name}", cli.get_command(ctx, name))


def _help(path: str) -> str:
    """The --help text of ``path`` as a user sees it (80 columns)."""
    result = click.testing.CliRunner().invoke(cli, [*path.split()[1:], "--help"], terminal_width=80)
    assert result.exit_code == 0, result.output
    return result.output


def _shell(line: str) -> str:
    """``line`` after the shell's expansions, roughly: a command substitution stands for some value, an
    unquoted variable that a fresh machine lacks expands to nothing, and environment assignments go."""
    line = re.sub(r"\$\([^)]*\)", "VALUE", line.strip())
    line = re.sub(r'("[^"]*")|\$\{?\w+\}?', lambda m: m.group(1) or "", line)
    return re.sub(r"^([A-Z_]+=\S*\s+)+", "", line)


def _examples(text: str) -> list[str]:
    """The `loraship ...` lines of a help text's examples, continuation lines joined."""
    lines, joined = text.splitlines(), []
    for i, line in enumerate(lines):
        if _shell(line).startswith("loraship "):
            command, j = line.strip(), i
            while command.endswith("\\"):
                j += 1
                command = command[:-1] + " " + lines[j].strip()
            joined.append(command)
    return joined


def _args(example: str) -> list[str]:
    """A pasted example line as the shell hands it to loraship (comments and a trailing `&` go)."""
    words = shlex.split(_shell(example), comments=True)
    if words[-1] == "&":
        words.pop()
    assert words[0] == "loraship", example
    return words[1:]


@pytest.mark.parametrize("path", [path for path, _ in _commands()])
def test_every_option_is_described_and_every_example_parses(path, tmp_path, monkeypatch):
    command = dict(_commands())[path]
    undescribed = [p.opts[0] for p in command.params if isinstance(p, click.Option) and not (p.help or "").strip()]
    assert not undescribed, f"{path}: options without help: {undescribed}"
    text = _help(path)
    examples = _examples(text)
    assert examples, f"{path} --help has no example"
    monkeypatch.chdir(tmp_path)  # paths that must exist are made here, as the README's earlier steps would
    for example in examples:
        args = _args(example)
        ctx = click.Context(cli, info_name="loraship", obj={})
        target: click.Command = cli
        while isinstance(target, click.Group):
            name = args.pop(0)
            target = target.get_command(ctx, name)
            assert target is not None, f"{example}: no command {name!r}"
            if isinstance(target, click.Group):
                ctx = click.Context(target, info_name=name, parent=ctx)
        for param in target.params:
            if isinstance(param.type, click.Path) and param.type.exists:
                for opt in set(param.opts) & set(args):
                    made = tmp_path / args[args.index(opt) + 1]
                    made.parent.mkdir(parents=True, exist_ok=True)
                    made.mkdir(exist_ok=True) if param.type.dir_okay else made.touch()
        try:
            parsed = target.make_context(name, args, parent=ctx)  # click's parser: options, types, choices, required ones
        except click.UsageError as exc:
            pytest.fail(f"{example!r} does not parse: {exc.format_message()}")
        swallowed = {k: v for k, v in parsed.params.items() if isinstance(v, str) and v.startswith("--")}
        assert not swallowed, f"{example!r}: an option took the next option as its value: {swallowed}"


def test_azure_summaries_are_whole():
    text = _help("loraship azure")
    rows = text.split("Commands:", 1)[1].strip().splitlines()
    assert len(rows) == 7 and not any(row.rstrip().endswith(("...", "…")) for row in rows), rows
    for row in rows:
        name, summary = row.split(None, 1)
        assert summary.endswith("."), row


def test_demo_help_describes_arch_size_and_protocol():
    text = _help("loraship demo")
    for option in ("--arch", "--size", "--protocol"):
        line = next(line for line in text.splitlines() if line.strip().startswith(option))
        assert len(line.split(None, 2)) == 3 and "[default:" not in line.split(None, 2)[2][:10], line


def test_debug_after_the_command_does_what_it_does_before(monkeypatch, capsys):
    """`--debug` is accepted after every command's name and sets the same ``ctx.obj["debug"]`` that
    `serve` and `ship` read; the error boundary then shows the traceback."""
    seen = []

    @click.command()
    @click.pass_context
    def probe(ctx: click.Context) -> None:
        seen.append(ctx.obj["debug"])

    module = types.ModuleType("loraship_probe_command")
    module.probe = probe
    monkeypatch.setitem(sys.modules, "loraship_probe_command", module)
    monkeypatch.setitem(COMMANDS, "probe", ("loraship_probe_command:probe", "A probe."))
    for args in (["probe"], ["--debug", "probe"], ["probe", "--debug"]):
        main(args)
    assert seen == [False, True, True]
    for path, command in _commands():
        assert any("--debug" in p.opts for p in command.params), path
    assert "--debug" in _help("loraship azure status")


def test_debug_after_the_command_shows_the_traceback():
    from loraship.triton_repo.localhost import free_port

    url = f"127.0.0.1:{free_port()}"
    run = [sys.executable, "-m", "loraship.cli.main", "generate", "--url", url, "--timeout", "5", "hi"]
    plain = subprocess.run(run, capture_output=True, text=True, timeout=120)
    debug = subprocess.run([*run[:4], "--debug", *run[4:]], capture_output=True, text=True, timeout=120)
    line = f"cannot reach Triton at {url} (grpc) (start it with `loraship serve --repo REPO`, or check --url)"
    assert (plain.returncode, plain.stderr.splitlines()) == (1, [f"Error: {line}"])
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.rstrip().endswith(f"EndpointError: {line}")
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert "loraship generate --debug" in readme  # the README says where --debug goes
