"""Export -> timm local-dir (without ssl_em) and load_backbone: identical, strict, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from pretrain_utils import TINY_VIT

from ssl_em.backbones import BackboneError, BackboneMeta, build_backbone, load_backbone
from ssl_em.data.normalize import Normalization
from ssl_em.export import export_backbone, export_run
from ssl_em.pretrain.base import run_metadata

ARCH = "vit_tiny_patch16_224"


@pytest.fixture
def exported(tmp_path):
    torch.manual_seed(0)
    model = build_backbone(ARCH, img_size=32, **TINY_VIT).eval()
    meta = BackboneMeta(architecture=ARCH, model_args=run_metadata(model, None)["model_args"], img_size=32, patch_size=8,
                        pixel_size_nm=8.0, normalization=Normalization(0.4, 0.2).to_dict(), method="test", steps=3)
    out = export_backbone(model, tmp_path / "bb", meta)
    return model, out


def test_files_and_metadata(exported):
    _, out = exported
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "ssl_em.json", "README.md"}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == ARCH
    assert cfg["model_args"]["in_chans"] == 1 and cfg["model_args"]["depth"] == 2 and cfg["model_args"]["img_size"] == [32, 32]
    assert cfg["pretrained_cfg"]["mean"] == [0.4] and cfg["pretrained_cfg"]["std"] == [0.2]
    meta = json.loads((out / "ssl_em.json").read_text())
    assert meta["patch_size"] == 8 and meta["pixel_size_nm"] == 8.0 and meta["normalization"]["mean"] == 0.4


def test_timm_local_dir_without_ssl_em(exported, tmp_path):
    """The model card's timm snippet, run as written from beside the folder in a process
    where ssl_em cannot be imported, gives the same features as the exported backbone."""
    import re

    model, out = exported
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    np.save(tmp_path / "x.npy", x.numpy())
    snippet = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S)[1].split("import ssl_em")[0]
    script = textwrap.dedent("""
        import sys
        sys.modules["ssl_em"] = None  # any import of ssl_em would fail
        import numpy as np, torch
        torch.set_num_threads(1)
    """) + snippet + textwrap.dedent(f"""
        assert cfg["crop_pct"] == 1.0
        with torch.no_grad():
            y = model.eval()(torch.from_numpy(np.load("{tmp_path / 'x.npy'}")))
        np.save("{tmp_path / 'y.npy'}", y.numpy())
        assert not any(k.startswith("ssl_em") for k, v in sys.modules.items() if v is not None)
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=out.parent, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-1500:]
    with torch.no_grad():
        assert np.array_equal(np.load(tmp_path / "y.npy"), model(x).numpy())


def test_load_backbone_roundtrip(exported):
    model, out = exported
    loaded, meta = load_backbone(out)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))
    assert meta.architecture == ARCH and meta.norm == Normalization(0.4, 0.2) and meta.in_chans == 1


def test_load_backbone_rejects_other_architecture(exported):
    _, out = exported
    with pytest.raises(BackboneError, match="not the resnet18"):
        load_backbone(out, architecture="resnet18")
    # Metadata that names an architecture the weights do not fit: strict load, clear error.
    meta = json.loads((out / "ssl_em.json").read_text())
    meta["model_args"]["depth"] = 3
    (out / "ssl_em.json").write_text(json.dumps(meta))
    with pytest.raises(BackboneError, match="do not fit.*missing.*blocks.2"):
        load_backbone(out)


def test_load_backbone_needs_safetensors_and_meta(tmp_path):
    with pytest.raises(BackboneError, match="model.safetensors"):
        load_backbone(tmp_path)


def test_build_backbone_errors():
    with pytest.raises(BackboneError, match="did you mean.*vit_small_patch16_224"):
        build_backbone("vit_smal_patch16_224")
    with pytest.raises(BackboneError, match="not divisible by the patch size 8"):
        build_backbone(ARCH, img_size=36, **TINY_VIT)
    cnn = build_backbone("resnet18", img_size=36)  # CNNs take any size; img_size is not passed
    assert cnn.conv1.in_channels == 1 and cnn.num_classes == 0


def test_export_from_lightning_checkpoint(tmp_path):
    """export_run picks module.backbone's weights out of a checkpoint and loads them strictly."""
    torch.manual_seed(0)
    model = build_backbone(ARCH, img_size=32, **TINY_VIT).eval()
    state = {f"backbone.{k}": v for k, v in model.state_dict().items()} | {"momentum_backbone.cls_token": torch.zeros(1)}
    ckpt = {"state_dict": state, "global_step": 7, "ssl_em": {**run_metadata(model, None), "method": "ssl_em.pretrain.mae.MAE", "recipe": "/home/someone/recipes/r.yaml"}}
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    torch.save(ckpt, tmp_path / "run" / "checkpoints" / "last.ckpt")
    out = export_run(tmp_path / "run", tmp_path / "bb")
    loaded, meta = load_backbone(out)
    assert meta.steps == 7 and meta.method == "ssl_em.pretrain.mae.MAE" and meta.img_size == 32
    assert meta.recipe == "r"  # an old checkpoint's recipe path becomes its name
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))


def test_export_cli_writes_from_rank_0_only(tmp_path, monkeypatch, capsys):
    """A job script running `ssl-em export` on every rank (srun: SLURM_PROCID; torchrun:
    RANK) writes the folder once, from rank 0; the others say so and write nothing."""
    from ssl_em.cli import main

    torch.manual_seed(0)
    model = build_backbone(ARCH, img_size=32, **TINY_VIT).eval()
    ckpt = {"state_dict": {f"backbone.{k}": v for k, v in model.state_dict().items()}, "global_step": 1,
            "ssl_em": {**run_metadata(model, None), "method": "ssl_em.pretrain.mae.MAE"}}
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    torch.save(ckpt, tmp_path / "run" / "checkpoints" / "last.ckpt")
    monkeypatch.delenv("RANK", raising=False)
    for env, value in (("SLURM_PROCID", "1"), ("RANK", "3")):
        monkeypatch.setenv(env, value)
        assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "bb")]) == 0
        assert f"rank {value}: rank 0 writes" in capsys.readouterr().out
        assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    monkeypatch.setenv("RANK", "0")
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "bb")]) == 0
    assert (tmp_path / "bb" / "ssl_em.json").is_file()


def test_half_precision_export_halves_the_file_and_loads_as_float32(exported, tmp_path):
    """`--dtype float16` (the shipped backbone's storage) : half the bytes, float32 model on
    load, weights equal to the float16-rounded originals, in ssl_em and in plain timm."""
    import timm

    model, full = exported
    half = export_backbone(model, tmp_path / "half", BackboneMeta.from_dict(json.loads((full / "ssl_em.json").read_text())), dtype="float16")
    ratio = (half / "model.safetensors").stat().st_size / (full / "model.safetensors").stat().st_size
    assert 0.45 < ratio < 0.55
    loaded, _ = load_backbone(half)
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert b.dtype == a.dtype, k
        assert torch.equal(b, a.half().to(a.dtype) if a.is_floating_point() else a), k
    via_timm = timm.create_model(f"local-dir:{half}", pretrained=True)
    assert next(via_timm.parameters()).dtype == torch.float32


def test_timm_transform_keeps_em_tiles_and_documents_the_stretch(tmp_path):
    """timm's own data config + transform from the exported folder: a 64 px tile stays 64 px
    (no ImageNet crop_pct resize), bilinear, standardised with the recorded mean/std; the
    stretch it cannot do is stated in pretrained_cfg's notes and done by ssl_em.preprocessing."""
    import timm
    from PIL import Image

    import ssl_em

    torch.manual_seed(0)
    model = build_backbone("test_resnet")
    meta = BackboneMeta(architecture="test_resnet", model_args={"in_chans": 1}, img_size=64, normalization=Normalization(0.4, 0.2).to_dict())
    out = export_backbone(model, tmp_path / "cnn", meta)
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True)
    cfg = timm.data.resolve_data_config(model=loaded)
    assert cfg["crop_pct"] == 1.0 and cfg["interpolation"] == "bilinear" and cfg["input_size"] == (1, 64, 64)
    assert tuple(cfg["mean"]) == (0.4,) and tuple(cfg["std"]) == (0.2,)
    assert "p99.5" in " ".join(loaded.pretrained_cfg["notes"])
    tile = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    x = timm.data.create_transform(**cfg)(Image.fromarray(tile))
    assert x.shape == (1, 64, 64)
    np.testing.assert_allclose(x[0].numpy(), (tile / 255 - 0.4) / 0.2, atol=1e-5)  # no resampling: pixel for pixel

    pre = ssl_em.preprocessing(out)
    lo, hi = np.percentile(tile, [0.5, 99.5])
    np.testing.assert_allclose(pre(tile).numpy(), (np.clip((tile - lo) / (hi - lo), 0, 1) - 0.4) / 0.2, atol=1e-5)


def test_model_card_front_matter_pixel_size_and_permissions(exported, tmp_path):
    """The Hub's own ModelCard parser reads license, library and pipeline tag; the card gives
    the recorded pixel size; every file is readable by others under the usual umask 022."""
    import os
    import stat

    huggingface_hub = pytest.importorskip("huggingface_hub", reason="huggingface_hub (installed with timm) parses model cards")
    _, out = exported
    card = huggingface_hub.ModelCard.load(out / "README.md")
    assert card.data.license == "other" and card.data.library_name == "timm"  # no licence stated: the data's terms
    assert card.data.pipeline_tag == "image-feature-extraction" and "electron-microscopy" in card.data.tags
    assert "| pixel size | 8 nm |" in card.text and "unknown" not in card.text
    assert str(tmp_path) not in (out / "README.md").read_text() + (out / "ssl_em.json").read_text()

    old = os.umask(0o022)
    try:
        model, meta = _tiny()
        export_backbone(model, tmp_path / "shared", meta)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "shared").iterdir()}
    assert modes == dict.fromkeys(["config.json", "model.safetensors", "ssl_em.json", "README.md"], 0o644)


def _tiny():
    model = build_backbone(ARCH, img_size=32, **TINY_VIT)
    return model, BackboneMeta(architecture=ARCH, model_args=run_metadata(model, None)["model_args"], img_size=32, patch_size=8)


def test_load_backbone_recovers_a_folder_left_by_a_crash(exported, tmp_path):
    _, exported = exported
    hidden = exported.with_name(f".{exported.name}.old")
    exported.rename(hidden)
    model, meta = load_backbone(exported)
    assert exported.is_dir() and not hidden.exists()


def test_cnn_export_records_its_training_tile_for_timm(tmp_path):
    """A CNN's model_args hold no img_size: its export left timm's resolve_data_config at
    ImageNet's 224, so timm's own transform resized every EM tile. The pretraining run
    records its tile, and the export gives it to timm (crop 1.0)."""
    import timm
    from types import SimpleNamespace

    torch.manual_seed(0)
    model = build_backbone("test_resnet").eval()
    run = run_metadata(model, SimpleNamespace(tile_size=96))
    assert run["tile_size"] == 96
    ckpt = {"state_dict": {f"backbone.{k}": v for k, v in model.state_dict().items()}, "global_step": 2, "ssl_em": {**run, "method": "ssl_em.pretrain.spark.SparK"}}
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    torch.save(ckpt, tmp_path / "run" / "checkpoints" / "last.ckpt")
    out = export_run(tmp_path / "run", tmp_path / "cnn")
    cfg = timm.data.resolve_data_config(model=timm.create_model(f"local-dir:{out}", pretrained=True))
    assert cfg["input_size"] == (1, 96, 96) and cfg["crop_pct"] == 1.0
