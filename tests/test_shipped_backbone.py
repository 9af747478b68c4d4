"""The EM backbone shipped in checkpoints/: small enough to commit, loads strictly in ssl_em
and in plain timm, fine-tunes on a fresh install, and continues pretraining."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ssl_em.backbones import load_backbone

SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "em_resnet18_spark"
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "pretrain" / "spark_resnet18_cpu.yaml"


def test_folder_is_small_and_self_describing():
    files = {p.name: p.stat().st_size for p in SHIPPED.iterdir()}
    assert set(files) == {"config.json", "model.safetensors", "ssl_em.json", "README.md"}
    assert sum(files.values()) <= 25 * 2**20  # half precision: a float32 ResNet-18 is 45 MB
    meta = json.loads((SHIPPED / "ssl_em.json").read_text())
    assert meta["architecture"] == "resnet18" and meta["method"] == "ssl_em.pretrain.spark.SparK" and meta["in_chans"] == 1
    card = (SHIPPED / "README.md").read_text()
    for needed in ("## Training data", "## Licences", "## Label efficiency", "ssl-em finetune --backbone checkpoints/em_resnet18_spark"):
        assert needed in card, needed


def test_loads_strictly_in_ssl_em_and_timm():
    import timm

    model, meta = load_backbone(SHIPPED)
    via_timm = timm.create_model(f"local-dir:{SHIPPED}", pretrained=True).eval()
    model.eval()
    x = torch.randn(1, 1, 64, 64)
    assert torch.equal(model(x), via_timm(x))
    assert meta.norm.std > 0


def test_finetunes_from_the_shipped_backbone(tmp_path):
    from ssl_em.finetune.cli import finetune
    from ssl_em.synthetic import make_volume

    em = make_volume(shape=(3, 64, 64), seed=0)
    model, metrics = finetune(SHIPPED, em.image, em.semantic, [0, 1], [2], max_steps=2, tile_size=64, batch_size=2, holdout=0.0)
    assert 0.0 <= metrics["mean_iou"] <= 1.0
    loaded, _ = load_backbone(SHIPPED)
    assert type(model.backbone) is type(loaded)


def test_pretraining_continues_from_the_shipped_backbone(tmp_path):
    from pretrain_utils import make_archive

    from ssl_em.pretrain.cli import init_from_export, make_cli

    archive = make_archive(tmp_path / "em.zarr")
    cli = make_cli(["--config", str(RECIPE), "--data", str(archive), "--run_dir", str(tmp_path / "run")])
    init_from_export(cli.model, SHIPPED)
    shipped, _ = load_backbone(SHIPPED)
    assert all(torch.equal(a, b) for a, b in zip(cli.model.backbone.state_dict().values(), shipped.state_dict().values()))
