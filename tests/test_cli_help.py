"""Every command's --help renders (no `%%` left over, no traceback), and the test command prints its summary."""

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from ponder.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def _commands(parser, path=()):
    """Every command path: (), ("train",), and deeper for subcommands that have their own."""
    yield path
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, path + (name,))


COMMANDS = list(_commands(build_parser()))


def test_every_command_is_found():
    assert {("train",), ("sft",), ("eval",), ("pretrain",)} <= set(COMMANDS)


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "ponder")
def test_help_renders(path, capsys):
    with pytest.raises(SystemExit) as exit:
        main([*path, "--help"])
    out, err = capsys.readouterr()
    assert exit.value.code == 0, err
    assert "usage: ponder" in out and not err
    assert "%%" not in out and "%(" not in out, out


@pytest.mark.parametrize("command, required", [("train", "recipe"), ("sft", "recipe"), ("distill", "recipe"),
                                               ("pretrain", "recipe"), ("config", "COMMAND")])
def test_a_bare_command_names_only_what_it_requires(command, required, capsys):
    """Overrides are optional: argparse named them required too (`recipe, overrides`), for a nargs="*" positional
    without a default."""
    with pytest.raises(SystemExit):
        main([command])
    # one line, as ponder's own mistakes are: no usage block above it
    assert capsys.readouterr().err.splitlines() == [
        f"ponder {command}: error: the following arguments are required: {required} (see ponder {command} --help)"]


def test_the_test_command_prints_its_summary(tmp_path):
    """`make test` runs pytest with the Makefile's flags on top of pyproject's addopts: -q twice drops the summary."""
    make = (ROOT / "Makefile").read_text()
    line = next(l for l in make.splitlines() if "-m pytest" in l and l.startswith("\t"))
    flags = shlex.split(line.split("-m pytest", 1)[1])
    (tmp_path / "test_one.py").write_text("def test_one():\n    pass\n")
    out = subprocess.run([sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path),
                          *flags, "-p", "no:cacheprovider", str(tmp_path / "test_one.py")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"^\d+ passed in ", out.stdout, re.M), out.stdout
