"""Every command that README.md, docs/, the Makefile and the configs' comments show works as written.

Commands are collected from the code these files show (fenced blocks with continuation lines joined, inline code
spans, the Makefile's lines with its variables expanded, YAML comments); trailing ``# comments`` are dropped.

``mole-train`` commands (those with ``...`` placeholders are left out) are parsed by the CLI with ``--print_config``
appended: a flag, a key or a file that no longer exists fails here. The runs themselves are exercised in
``tests/training``.

``python tools/<name>.py ...`` commands (any interpreter path and environment prefix, or ``torchrun ...
tools/<name>.py``) are parsed by the tool's own parser (its ``build_parser()``) as written: a flag that no longer
exists, a wrong choice or a missing required argument fails here. Synopses are expanded: ``[optional parts]`` are
parsed both included and left out, ``a|b`` and ``{a,b}`` once per alternative, a ``...`` that stands for more of
the same is dropped, and upper-case placeholders (``CKPT``, ``DIR``) are parsed as the values they stand for. The
commands that cannot be parsed as written are listed in ``NOT_PARSED`` with the reason.

``mole-convert <format> ...`` commands are parsed by its parser (``mole_lightning.convert.build_parser()``), synopses
expanded the same way; every format has one.

The commands without placeholders of the tools that finish in seconds (``RUN_TOOLS``) also run as written, in a
subprocess, in a temporary folder prepared with the files they read (small demo data, a checkpoint, a question file
with its images), with all optional parts of a synopsis included. The others are parsed only: the benchmarks
(``bench_*``), ``conflict_study`` and ``real_conflict_study`` take minutes (``--report-only`` and ``--compare`` read
the results of such runs), and llava_to_shards' command reads an image folder at an absolute path (``/data/llava``);
its command line is run on a folder of its own by ``tests/data/test_tool_commands.py``.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
from PIL import Image

import mole_lightning
from mole_lightning import convert, export_command, routing_report
from mole_lightning.cli import cli_main
from mole_lightning.data import demo
from mole_lightning.eval import comparison
from tests.conftest import demo_at, tiny_checkpoint

ROOT = Path(__file__).parents[1]
SRC = Path(mole_lightning.__file__).parents[1]
SOURCES = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    ROOT / "Makefile",
    *sorted((ROOT / "configs").rglob("*.yaml")),
]
SUBCOMMANDS = ("fit", "validate", "test", "predict")


def make_variables(text: str) -> dict[str, str]:
    """``NAME := value`` (``=``, ``?=``) assignments of a Makefile, each value with the variables it names expanded."""
    variables: dict[str, str] = {}
    for name, value in re.findall(r"^(\w+)\s*[:?]?=\s*(.*?)\s*$", text, flags=re.M):
        variables[name] = re.sub(r"\$\((\w+)\)", lambda m: variables.get(m.group(1), m.group(0)), value)
    return variables


def code_snippets(path: Path) -> list[str]:
    """The code a file shows, one string per line or inline code span (continuation lines joined): the lines of
    fenced blocks and the inline spans of Markdown, every line of a Makefile (variables expanded) or of a YAML file
    (comment markers dropped)."""
    text = path.read_text(encoding="utf-8")
    if path.name == "Makefile":
        variables = make_variables(text)
        text = re.sub(r"\$\((\w+)\)", lambda m: variables.get(m.group(1), m.group(0)), text)
    if path.suffix != ".md":
        return [line.strip().lstrip("#").strip() for line in text.replace("\\\n", " ").splitlines()]
    snippets = []
    for index, part in enumerate(re.split(r"^```.*$", text, flags=re.M)):
        if index % 2:  # inside a fenced block
            snippets += part.replace("\\\n", " ").splitlines()
        else:  # prose: its inline code spans, which may wrap; `\|` is a pipe escaped in a table
            snippets += [span.replace("\n", " ").replace("\\|", "|") for span in re.findall(r"`([^`]+)`", part)]
    return snippets


def command_text(text: str) -> str:
    """A command's words up to a trailing comment, whitespace normalised."""
    return re.sub(r"\s+", " ", re.split(r"\s#\s|\s{2,}#|`", text)[0]).strip()


# --------------------------------------------------------------------------------------------------------- mole-train
def documented_commands() -> list[str]:
    commands = set()
    for path in SOURCES:
        for snippet in code_snippets(path):
            match = re.search(rf"mole-train ((?:{'|'.join(SUBCOMMANDS)}) .*)", snippet)
            if match is None:
                continue
            command = command_text(match.group(1)).rstrip(')"')
            if "..." in command or not re.search(r"--config \S+\.yaml", command):
                continue
            commands.add(command)
    return sorted(commands)


COMMANDS = documented_commands()


def test_the_documented_commands_are_found():
    assert len(COMMANDS) >= 10  # README, docs/training.md, docs/data.md and config comments all show some
    assert any("fsdp2_cpu.yaml" in c for c in COMMANDS) and any("llava_mole_7b.yaml" in c for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_documented_command_parses(command, monkeypatch):
    monkeypatch.chdir(ROOT)  # the documented relative paths are from the repository root
    args = [a for a in shlex.split(command) if a != "--print_config"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        cli_main([*args, "--print_config"])
    assert exit_info.value.code in (0, None), out.getvalue()[-2000:]
    assert "model:" in out.getvalue() and "trainer:" in out.getvalue()


# ------------------------------------------------------------------------------------------------------------ tools
TOOL_COMMAND = re.compile(
    r"(?:(?:(?:^|\s)(?:\S*/)?python3?|(?:^|\s)torchrun(?: --[\w-]+(?:[= ]\w+)?)*)\s+|^)tools/(\w+)\.py(?=\s|$)(.*)"
)
ALTERNATIVES = re.compile(r"\{[\w.-]+(?:,[\w.-]+)+\}|[\w.-]+(?:\|[\w.-]+)+")  # {a,b} or a|b
PLACEHOLDER = re.compile(r"\.\.\.|\b[A-Z][A-Z_]{2,}\b")  # ..., CKPT, DIR, CKPT_OR_MOLE_EXPORT
# tools documented as console scripts (parsed below); their scripts stay for old command lines
AS_CONSOLE_SCRIPTS = {
    "convert_llava_questions": "mole-convert",
    "export_adapter": "mole-export",
    "make_demo_data": "mole-demo-data",
    "routing_report": "mole-routing-report",
}
NOT_PARSED: dict[str, str] = {}  # shown command -> why it is not parsed


class ToolCommand(NamedTuple):
    """``python tools/<tool>.py <args>`` as shown (``args`` whitespace normalised) and the files showing it."""

    tool: str
    args: str
    sources: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.tool}.py {self.args}".strip()


def documented_tool_commands() -> list[ToolCommand]:
    """Every distinct tool command line shown; a bare ``tools/<name>.py`` without an interpreter counts only at the
    start of a snippet and with arguments (otherwise it is the file's name in a sentence)."""
    found: dict[tuple[str, str], set[str]] = {}
    for path in SOURCES:
        for snippet in code_snippets(path):
            match = TOOL_COMMAND.search(snippet)
            if match is None or (match.group(0).startswith("tools/") and not match.group(2).strip()):
                continue
            key = (match.group(1), command_text(match.group(2)))
            found.setdefault(key, set()).add(str(path.relative_to(ROOT)))
    return [ToolCommand(tool, args, tuple(sorted(sources))) for (tool, args), sources in sorted(found.items())]


def synopsis_argvs(args: str) -> list[list[str]]:
    """The argument lists a shown command stands for, the one with every ``[optional part]`` first, then the one
    without them; ``a|b`` and ``{a,b}`` give one list per alternative, a ``...`` (more of the same) is dropped."""
    forms = [re.sub(r"\[([^\[\]]*)\]", r"\1", args), re.sub(r"\s*\[[^\[\]]*\]", "", args)]
    argvs = []
    for form in dict.fromkeys(forms):
        words = [
            [w] if ALTERNATIVES.fullmatch(w) is None else re.split(r"[|,]", w.strip("{}")) for w in shlex.split(form)
        ]
        argvs += [[w for w in argv if w != "..."] for argv in itertools.product(*words)]
    return argvs


TOOL_COMMANDS = documented_tool_commands()
PARSED = [c for c in TOOL_COMMANDS if str(c) not in NOT_PARSED]


def test_every_tool_is_documented_with_a_command():
    """Each script of tools/ is shown with a command line, except those documented as console scripts."""
    tools = {path.stem for path in (ROOT / "tools").glob("*.py")}
    assert set(AS_CONSOLE_SCRIPTS) <= tools
    assert {c.tool for c in TOOL_COMMANDS} | set(AS_CONSOLE_SCRIPTS) == tools
    assert set(AS_CONSOLE_SCRIPTS.values()) <= set(PACKAGE_COMMANDS)
    sources = {source for c in TOOL_COMMANDS for source in c.sources}
    assert {"README.md", "configs/demo.yaml", "docs/conflict_study.md", "docs/benchmarks.md"} <= sources
    assert set(NOT_PARSED) <= {str(c) for c in TOOL_COMMANDS}  # no stale exemption


@pytest.mark.parametrize("command", PARSED, ids=str)
def test_documented_tool_command_parses(command):
    parser = importlib.import_module(f"tools.{command.tool}").build_parser()
    for argv in synopsis_argvs(command.args):
        error = io.StringIO()
        try:
            with contextlib.redirect_stderr(error):
                parser.parse_args(argv)
        except SystemExit:
            pytest.fail(
                f"{command} (shown in {', '.join(command.sources)}) does not parse as {argv}: {error.getvalue()}"
            )


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, demo) -> Path:
    """A folder with what the run commands read, at the paths they name: the demo data (linked), a checkpoint
    ``runs/demo/checkpoints/last.ckpt`` of the tiny model with the demo tokenizer, and a LLaVA-1.5 question file
    ``llava_pope_test.jsonl`` with its images in ``val2014/`` and labels in ``labels.jsonl``."""
    root = demo_at(demo, tmp_path_factory.mktemp("documented"))
    (root / "runs/demo/checkpoints").mkdir(parents=True)
    tiny_checkpoint(root / "runs/demo/checkpoints/last.ckpt", demo.tokenizer)
    (root / "val2014").mkdir()
    questions, labels = [], []
    for index, color in enumerate(("red", "blue")):
        Image.new("RGB", (24, 16), color).save(root / "val2014" / f"{color}.jpg")
        questions.append({"question_id": index, "image": f"{color}.jpg", "text": f"Is the image {color}?"})
        labels.append({"question_id": index, "label": "yes"})
    (root / "llava_pope_test.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    (root / "labels.jsonl").write_text("".join(json.dumps(label) + "\n" for label in labels))
    return root


# ----------------------------------------------------------------------------------- mole-convert, mole-demo-data...
PACKAGE_COMMANDS = {
    "mole-convert": convert,
    "mole-demo-data": demo,
    "mole-compare": comparison,
    "mole-routing-report": routing_report,
    "mole-export": export_command,
}
"""Console scripts of the package whose documented command lines are parsed by their module's ``build_parser()``."""


def documented_package_commands() -> list[tuple[str, str]]:
    """Every distinct ``(script, arguments)`` shown for the scripts of :data:`PACKAGE_COMMANDS` (a mention without
    its arguments, or with ``...``, is prose, not a command)."""
    found = set()
    scripts = "|".join(re.escape(name) for name in PACKAGE_COMMANDS)
    for path in SOURCES:
        for snippet in code_snippets(path):
            match = re.search(rf"(?:^|[\s/])({scripts})\s+(\S.*)", snippet)
            if match is None or "..." in match.group(2):
                continue
            arguments = command_text(match.group(2)).rstrip(')"')
            if match.group(1) != "mole-compare" and "--out" not in arguments:
                continue
            found.add((match.group(1), arguments))
    return sorted(found)


PACKAGE_COMMAND_LINES = documented_package_commands()
CONVERT_COMMANDS = [arguments for script, arguments in PACKAGE_COMMAND_LINES if script == "mole-convert"]


def test_the_documented_convert_commands_cover_every_format():
    formats = {command.split()[0] for command in CONVERT_COMMANDS}
    assert formats == set(convert.RUNNERS), formats


def test_every_package_command_is_documented_with_its_arguments():
    assert {script for script, _ in PACKAGE_COMMAND_LINES} == set(PACKAGE_COMMANDS)


RUN = [args for script, args in PACKAGE_COMMAND_LINES if script == "mole-convert" and args.startswith("questions ")]
RUN = [args for args in RUN if PLACEHOLDER.search(args) is None]  # seconds each


def test_a_documented_question_conversion_is_run():
    assert RUN


@pytest.mark.slow
@pytest.mark.parametrize("command", RUN)
def test_documented_question_conversion_runs(command, prepared):
    """``mole-convert questions ...`` as shown, with the installed script, in a folder holding the files it names."""
    argv = synopsis_argvs(command)[0]
    mole_convert = Path(sys.executable).parent / "mole-convert"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(mole_convert), *argv], cwd=prepared, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    out = prepared / argv[argv.index("--out") + 1]
    assert out.is_dir() and any(out.iterdir()), f"mole-convert {command} wrote nothing to {out}"


@pytest.mark.parametrize(("script", "command"), PACKAGE_COMMAND_LINES)
def test_documented_package_command_parses(script, command):
    parser = PACKAGE_COMMANDS[script].build_parser()
    for argv in synopsis_argvs(command):
        error = io.StringIO()
        try:
            with contextlib.redirect_stderr(error):
                parser.parse_args([word.strip("\"'") for word in argv])
        except SystemExit:
            pytest.fail(f"{script} {command} does not parse as {argv}: {error.getvalue()}")
