"""Every ``mole-train`` command shown in README.md, docs/ and the configs' comments parses as written.

Commands are collected from code blocks and comments (continuation lines joined, trailing ``# comments`` dropped;
commands with ``...`` placeholders are left out), then parsed by the CLI with ``--print_config`` appended: a flag,
a key or a file that no longer exists fails here. The runs themselves are exercised in ``tests/training``.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from mole_lightning.cli import cli_main

ROOT = Path(__file__).parents[1]
SOURCES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "configs").rglob("*.yaml"))]
SUBCOMMANDS = ("fit", "validate", "test", "predict")


def documented_commands() -> list[str]:
    commands = set()
    for path in SOURCES:
        text = path.read_text(encoding="utf-8").replace("\\\n", " ")
        for line in text.splitlines():
            line = line.lstrip("#").strip()
            match = re.search(rf"mole-train ((?:{'|'.join(SUBCOMMANDS)}) .*)", line)
            if match is None:
                continue
            command = re.split(r"\s#\s|\s{2,}#|`", match.group(1))[0].strip().rstrip(")")
            if "..." in command or not re.search(r"--config \S+\.yaml", command):
                continue
            commands.add(re.sub(r"\s+", " ", command))
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
