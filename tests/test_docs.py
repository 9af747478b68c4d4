"""The front door stays true: README's commands, CI calling the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, re.S)


def test_ci_runs_the_readme_test_command():
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    test_cmd = blocks[1].strip().split("&& ", 2)[-1]  # after creating and activating the venv
    assert "pytest" in test_cmd
    assert test_cmd in (ROOT / ".ci" / "run").read_text()


def test_readme_main_command_is_the_demo():
    first = _bash_blocks((ROOT / "README.md").read_text())[0]
    assert "ssl-em demo" in first and "pip install -e ." in first


def test_every_cli_command_module_imports_and_configures():
    import argparse
    import importlib

    from ssl_em.cli import COMMANDS

    for name, (module, _) in COMMANDS.items():
        mod = importlib.import_module(module)
        assert hasattr(mod, "run_argv") or (hasattr(mod, "configure") and hasattr(mod, "run")), name
        if hasattr(mod, "configure"):
            mod.configure(argparse.ArgumentParser())
