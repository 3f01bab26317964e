"""The README's shell commands, read from README.md when the tests run (never copied here).

Every ``conaclip`` command in a fenced shell block (``bash``, ``console``, ...) must parse with
the real parser, and its subcommand's ``--help`` must answer. Those that finish in seconds run
as real subprocesses of the installed ``conaclip``: a ``console`` block's command must print
exactly the lines shown under it (the error example: exit 2, one line), and every
``conaclip ablate`` command runs with ``--dry-run`` (added where the README runs it for real),
which prints the trial list and starts nothing: exit 0, a trial count that matches the list and
the count in the README's comment where it gives one, and nothing written anywhere.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestrator.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"
SHELL_LANGUAGES = {"bash", "sh", "shell", "console", "shell-session"}
WORKED_EXAMPLE = "A worked example"
TRIAL_COUNT = re.compile(r"^(\d+) trials \(")


@dataclass(frozen=True)
class Command:
    argv: tuple[str, ...]  # after the program name
    comment: str  # the shell comment on its line, without '#'
    output: tuple[str, ...]  # lines shown under it in a console block
    language: str
    section: str  # the heading the block stands under
    line: int  # 1-based line of README.md where the command starts

    @property
    def subcommand(self) -> tuple[str, ...]:
        """The subcommand path: the words before the first option (``data synth``)."""
        path = []
        for word in self.argv:
            if word.startswith("-"):
                break
            path.append(word)
        return tuple(path[:2]) if path[:1] in (["data"], ["teacher"]) else tuple(path[:1])

    def __str__(self) -> str:
        return f"README.md:{self.line}: conaclip {shlex.join(self.argv)}"


def _split_comment(text: str) -> tuple[str, str]:
    """(command, comment): the first '#' outside quotes that starts a word opens the comment."""
    for index, char in enumerate(text):
        if char == "#" and (index == 0 or text[index - 1].isspace()):
            with contextlib.suppress(ValueError):  # unbalanced quotes: the '#' is quoted
                shlex.split(text[:index])
                return text[:index].rstrip(), text[index + 1 :].strip()
    return text, ""


def _conaclip_argv(command: str) -> tuple[str, ...] | None:
    words = shlex.split(command)
    if not words or Path(words[0]).name != "conaclip":
        return None
    return tuple(words[1:])


def readme_commands(text: str) -> list[Command]:
    """Every ``conaclip`` command in README's fenced shell blocks, continuation lines joined."""
    commands: list[Command] = []
    section, language = "", None
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        index += 1
        if language is None:
            if line.startswith("```"):
                language = line[3:].strip() or "text"
            elif line.startswith("#"):
                section = line.lstrip("#").strip()
            continue
        if line.startswith("```"):
            language = None
            continue
        if language not in SHELL_LANGUAGES or not line.strip():
            continue
        console = language in ("console", "shell-session")
        if console and not line.startswith("$ "):
            continue  # output, collected with its command below
        start = index
        body = line[2:] if console else line
        while body.endswith("\\") and index < len(lines):
            body = body[:-1] + " " + lines[index].strip()
            index += 1
        output = []
        while console and index < len(lines) and not lines[index].startswith(("$ ", "```")):
            output.append(lines[index])
            index += 1
        command, comment = _split_comment(body)
        argv = _conaclip_argv(command)
        if argv is not None:
            commands.append(Command(argv, comment, tuple(output), language, section, start))
    return commands


COMMANDS = readme_commands(README.read_text())


def _ids(commands: list[Command]) -> list[str]:
    return [f"L{c.line}-{'-'.join(c.subcommand)}" for c in commands]


def _run(argv: tuple[str, ...], tmp_path: Path) -> tuple[subprocess.CompletedProcess, Path]:
    """``conaclip argv`` as a user runs it, in an empty directory with an empty home."""
    script = Path(sys.executable).with_name("conaclip")
    program = [str(script)] if script.is_file() else [sys.executable, "-m", "orchestrator.cli"]
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "CONACLIP_HOME": str(tmp_path / "home")}
    result = subprocess.run(
        [*program, *argv], cwd=work, env=env, capture_output=True, text=True, timeout=300
    )
    return result, work


def _nothing_written(tmp_path: Path, work: Path) -> None:
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"], "a home was created"
    assert not any(work.iterdir()), f"--dry-run wrote {sorted(work.iterdir())}"


def test_the_readme_shows_its_worked_and_error_examples():
    worked = [c for c in COMMANDS if c.section == WORKED_EXAMPLE]
    assert len(worked) >= 8, f"the worked example lost its commands: {[str(c) for c in worked]}"
    assert any(c.subcommand == ("ablate",) and "--dry-run" in c.argv for c in worked)
    errors = [c for c in COMMANDS if c.output and c.output[0].startswith("conaclip: error:")]
    assert errors, "the README's error example (a console block with its output) is gone"


@pytest.mark.parametrize("command", COMMANDS, ids=_ids(COMMANDS))
def test_readme_command_parses_and_its_subcommand_has_help(command):
    parser = build_parser()
    try:
        args = parser.parse_args(list(command.argv))
    except SystemExit as error:
        pytest.fail(f"{command}: the parser refuses it (exit {error.code})")
    assert callable(args.handler), command
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
        build_parser().parse_args([*command.subcommand, "--help"])
    assert exited.value.code == 0
    assert out.getvalue().startswith(f"usage: conaclip {' '.join(command.subcommand)} ")


CONSOLE = [c for c in COMMANDS if c.output]


@pytest.mark.parametrize("command", CONSOLE, ids=_ids(CONSOLE))
def test_console_example_prints_what_the_readme_shows(command, tmp_path):
    result, work = _run(command.argv, tmp_path)
    shown = [line for line in command.output if line.strip()]
    is_error = shown[0].startswith("conaclip: error:")
    printed = (result.stderr if is_error else result.stdout).splitlines()
    assert result.returncode == (2 if is_error else 0), result.stderr
    assert printed == shown
    if is_error:
        assert result.stdout == ""
        _nothing_written(tmp_path, work)


ABLATE = [c for c in COMMANDS if c.subcommand == ("ablate",) and not c.output]


@pytest.mark.parametrize("command", ABLATE, ids=_ids(ABLATE))
def test_ablate_command_dry_run_lists_its_trials_and_runs_nothing(command, tmp_path):
    argv = command.argv if "--dry-run" in command.argv else (*command.argv, "--dry-run")
    result, work = _run(argv, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stdout.splitlines()
    if "--race" in argv:
        assert lines[0].startswith("race: round 1 runs every pair set at seeds 0..")
        lines = lines[1:]
    count = TRIAL_COUNT.match(lines[0])
    assert count, lines[0]
    trials = int(count.group(1))
    assert len(lines) == 1 + trials
    assert all(re.match(r"^\s*\d+  \S+\s+seed \d+  \S+$", line) for line in lines[1:])
    claimed = re.match(r"(\d+) trials\b", command.comment)
    if claimed:
        assert trials == int(claimed.group(1)), f"{command}: README says {command.comment!r}"
    _nothing_written(tmp_path, work)
