"""The command line's shape: ``python -m dmdiff``, each subcommand's arguments declared beside its
``main`` with the defaults of the code that uses them, and only the chosen subcommand imported."""

import gc
import importlib
import subprocess
import sys

import pytest

from dmdiff import cli
from dmdiff.cli import COMMANDS, build_parser
from dmdiff.model.tiling import DEFAULT_OVERLAP_PX, DEFAULT_TILE_PX
from dmdiff.train.config import PseudoConfig


def test_python_dash_m_dmdiff_runs_the_command_line():
    result = subprocess.run([sys.executable, "-m", "dmdiff", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "exit status" in result.stdout
    assert all(name in result.stdout for name in COMMANDS)


def test_the_console_script_imports_its_command_with_the_collector_paused_then_freezes(monkeypatch, tmp_path):
    seen, real_import = [], importlib.import_module

    def spy(name):
        seen.append((name, gc.isenabled()))
        return real_import(name)

    monkeypatch.setattr(importlib, "import_module", spy)
    monkeypatch.setattr(sys, "argv", ["dmdiff", "restore", "--model", str(tmp_path / "none"),
                                      "--input", str(tmp_path), "--out", str(tmp_path / "out")])
    try:
        assert cli.entry() == 2                                   # no such model: a usage error, as main() says
        assert gc.isenabled() and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
    assert seen[0] == ("dmdiff.restore", False)


def test_help_imports_no_subcommand_module():
    """``dmdiff --help`` lists the subcommands without importing torch or any of their modules."""
    code = ("import sys; from dmdiff.cli import build_parser; build_parser().format_help(); "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('dmdiff.train', 'dmdiff.model'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_builds_its_arguments(command):
    parser = build_parser(command)
    sub = parser._subparsers._group_actions[0].choices[command]
    assert sub.format_help()


def test_defaults_come_from_the_code_that_uses_them():
    args = build_parser("restore").parse_args(["restore", "--model", "m", "--input", "i", "--out", "o"])
    assert (args.tile, args.overlap) == (DEFAULT_TILE_PX, DEFAULT_OVERLAP_PX)
    args = build_parser("pseudo").parse_args(["pseudo", "--model", "m", "--out", "o"])
    assert (args.count, args.seed, args.noise_strength) == (PseudoConfig().count, PseudoConfig().seed,
                                                            PseudoConfig().noise_strength)
    help_text = build_parser("restore")._subparsers._group_actions[0].choices["restore"].format_help()
    assert f"(default {DEFAULT_TILE_PX})" in help_text


def test_an_unknown_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        build_parser(None).parse_args(["fly"])
    assert info.value.code == 2 and "invalid choice" in capsys.readouterr().err
