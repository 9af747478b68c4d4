"""The EM backbones shipped in checkpoints/: small enough to commit, load strictly in ssl_em
and in plain timm, fine-tune on a fresh install, and continue pretraining; the successor
names the backbone it continued."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ssl_em.backbones import load_backbone

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
SHIPPED = CHECKPOINTS / "em_resnet18_spark"
SUCCESSORS = [CHECKPOINTS / "em_resnet18_spark_v2", CHECKPOINTS / "em_resnet18_spark_v3"]  # each continued the one before
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "pretrain" / "spark_resnet18_cpu.yaml"


@pytest.mark.parametrize("folder", [SHIPPED, *SUCCESSORS], ids=lambda p: p.name)
def test_folder_is_small_and_self_describing(folder):
    files = {p.name: p.stat().st_size for p in folder.iterdir()}
    # the successor also carries SparK's decoder and mask tokens, for --init_from
    assert set(files) - {"pretrain_state.safetensors"} == {"config.json", "model.safetensors", "ssl_em.json", "README.md"}
    assert sum(files.values()) <= 25 * 2**20  # half precision: a float32 ResNet-18 is 45 MB
    meta = json.loads((folder / "ssl_em.json").read_text())
    assert meta["architecture"] == "resnet18" and meta["method"] == "ssl_em.pretrain.spark.SparK" and meta["in_chans"] == 1
    card = (folder / "README.md").read_text()
    for needed in ("## Training data", "## Licences", "## Label efficiency", f"ssl-em finetune --backbone checkpoints/{folder.name} "):
        assert needed in card, needed


@pytest.mark.parametrize("successor", SUCCESSORS, ids=lambda p: p.name)
def test_successor_names_its_parents_and_its_data(successor):
    """Re-exported by today's code: the lineage names every backbone it continued, oldest
    first, the last by its weights' hash; the images it drew from are listed, and no licence
    is claimed for the weights."""
    from ssl_em.lineage import weights_sha256

    _, meta = load_backbone(successor)
    chain = [SHIPPED, *SUCCESSORS]
    parents = chain[: chain.index(successor)]
    assert [p["name"] for p in meta.lineage] == [p.name for p in parents]
    assert meta.lineage[-1]["weights_sha256"] == weights_sha256(parents[-1] / "model.safetensors")
    assert meta.tiles == meta.steps * 32 and meta.data_sources and meta.license is None
    assert not any("fafb" in (s["source"] or "") for s in meta.data_sources)  # left out: terms not checked
    assert "\nlicense: other\n" in (successor / "README.md").read_text()


@pytest.mark.parametrize("folder", [SHIPPED, *SUCCESSORS], ids=lambda p: p.name)
def test_loads_strictly_in_ssl_em_and_timm(folder):
    import timm

    model, meta = load_backbone(folder)
    via_timm = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
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


@pytest.mark.parametrize("successor", SUCCESSORS, ids=lambda p: p.name)
def test_pretraining_continues_the_successors_method(tmp_path, successor):
    """The successor ships SparK's decoder and mask tokens: --init_from restores them
    exactly, so a lab's continued run needs no frozen-encoder phase."""
    from pretrain_utils import make_archive
    from safetensors.torch import load_file

    from ssl_em.pretrain.cli import init_from_export, make_cli

    archive = make_archive(tmp_path / "em.zarr")
    cli = make_cli(["--config", str(RECIPE), "--data", str(archive), "--run_dir", str(tmp_path / "run")])
    assert init_from_export(cli.model, successor)  # True: the method's own weights were loaded
    state, shipped = cli.model.state_dict(), load_file(str(successor / "pretrain_state.safetensors"))
    assert shipped and all(torch.equal(state[k], v.to(state[k].dtype)) for k, v in shipped.items())


def test_the_default_backbone_is_the_newest_successor_and_the_docs_name_only_shipped_ones():
    """SHIPPED_BACKBONE (the demo's and the napari widget's default) is the last of the chain,
    and every checkpoints/NAME the README points a newcomer to exists in the checkout."""
    import re

    from ssl_em.backbones import SHIPPED_BACKBONE

    assert SHIPPED_BACKBONE == SUCCESSORS[-1] and (SHIPPED_BACKBONE / "model.safetensors").is_file()
    readme = (CHECKPOINTS.parent / "README.md").read_text()
    named = set(re.findall(r"checkpoints/(em_[a-z0-9_]+)", readme))
    assert SHIPPED_BACKBONE.name in named
    assert all((CHECKPOINTS / name).is_dir() for name in named), named
