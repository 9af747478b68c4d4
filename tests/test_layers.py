"""Layering: pretraining and fine-tuning are siblings on shared foundations; neither imports
the other (checked in a fresh interpreter, so no earlier import hides a dependency)."""

from __future__ import annotations

import subprocess
import sys


def _imported_by(modules: list[str]) -> set[str]:
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules) + "print('\\n'.join(m for m in sys.modules if m.startswith('ssl_em')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_pretraining_imports_nothing_from_fine_tuning():
    loaded = _imported_by(["ssl_em.pretrain.spark", "ssl_em.pretrain.mae", "ssl_em.pretrain.contrastive", "ssl_em.pretrain.cli"])
    assert "ssl_em.pretrain.spark" in loaded
    assert not {m for m in loaded if m.startswith("ssl_em.finetune")}, sorted(m for m in loaded if m.startswith("ssl_em.finetune"))


def test_foundations_import_no_stage():
    loaded = _imported_by(["ssl_em.backbones", "ssl_em.atomic", "ssl_em.features", "ssl_em.layers", "ssl_em.ema", "ssl_em.precision"])
    assert "ssl_em.backbones" in loaded
    # ssl_em.export is the `ssl-em export` command: building or loading a backbone never needs it.
    assert not {m for m in loaded if m.startswith(("ssl_em.finetune", "ssl_em.pretrain", "ssl_em.export"))}

