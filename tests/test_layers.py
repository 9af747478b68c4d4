"""Layering: foundations below pretraining and fine-tuning, which are siblings; inference below
fine-tuning's training code. Each rule is checked in a fresh interpreter, so no earlier import
hides a dependency.

    foundations (backbones, atomic, features, layers, ema, precision, data)
      <- pretrain            (nothing from finetune or inference)
      <- inference           (from finetune: only the model folder and the heads it rebuilds)
      <- finetune            (training; scores with inference)
"""

from __future__ import annotations

import subprocess
import sys

#: What inference may use of ssl_em.finetune: the fine-tuned model folder and the heads it
#: rebuilds from it (network definitions, no training code).
INFERENCE_MAY_USE = {"ssl_em.finetune", "ssl_em.finetune.model_folder", "ssl_em.finetune.heads"}
INFERENCE = ["ssl_em.inference.predict", "ssl_em.inference.window", "ssl_em.inference.store", "ssl_em.inference.instance",
             "ssl_em.inference.evaluate", "ssl_em.inference.metrics", "ssl_em.inference.bioimageio"]


def _imported_by(modules: list[str]) -> set[str]:
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules) + "print('\\n'.join(m for m in sys.modules if m.startswith('ssl_em')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_pretraining_imports_nothing_from_fine_tuning_or_inference():
    loaded = _imported_by(["ssl_em.pretrain.spark", "ssl_em.pretrain.mae", "ssl_em.pretrain.contrastive", "ssl_em.pretrain.cli"])
    assert "ssl_em.pretrain.spark" in loaded
    above = sorted(m for m in loaded if m.startswith(("ssl_em.finetune", "ssl_em.inference")))
    assert not above, above


def test_foundations_import_no_stage():
    loaded = _imported_by(["ssl_em.backbones", "ssl_em.atomic", "ssl_em.features", "ssl_em.layers", "ssl_em.ema", "ssl_em.precision",
                           "ssl_em.data.labels", "ssl_em.data.normalize", "ssl_em.data.readers.open"])
    assert "ssl_em.backbones" in loaded
    # ssl_em.export is the `ssl-em export` command: building or loading a backbone never needs it.
    assert not {m for m in loaded if m.startswith(("ssl_em.finetune", "ssl_em.pretrain", "ssl_em.inference", "ssl_em.export"))}


def test_inference_imports_no_training_code():
    loaded = _imported_by(INFERENCE)
    assert "ssl_em.inference.predict" in loaded
    training = sorted(m for m in loaded if m.startswith(("ssl_em.finetune", "ssl_em.pretrain")) and m not in INFERENCE_MAY_USE)
    assert not training, training


def test_bioimageio_packages_exported_before_the_move_find_their_network():
    """Packages exported before inference had its own package name
    `ssl_em.finetune.bioimageio.ProbabilityNet` as their state dict's architecture."""
    from ssl_em.finetune.bioimageio import ProbabilityNet as old
    from ssl_em.inference.bioimageio import ProbabilityNet

    assert old is ProbabilityNet
