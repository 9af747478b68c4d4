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

from ssl_em.data.normalize import Normalization
from ssl_em.export import BackboneError, BackboneMeta, build_backbone, export_backbone, export_run, load_backbone
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
    model, out = exported
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    np.save(tmp_path / "x.npy", x.numpy())
    script = textwrap.dedent(f"""
        import sys
        sys.modules["ssl_em"] = None  # any import of ssl_em would fail
        import numpy as np, timm, torch
        torch.set_num_threads(1)
        m = timm.create_model("local-dir:{out}", pretrained=True).eval()
        with torch.no_grad():
            y = m(torch.from_numpy(np.load("{tmp_path / 'x.npy'}")))
        np.save("{tmp_path / 'y.npy'}", y.numpy())
        assert not any(k.startswith("ssl_em") for k, v in sys.modules.items() if v is not None)
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
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
    ckpt = {"state_dict": state, "global_step": 7, "ssl_em": {**run_metadata(model, None), "method": "ssl_em.pretrain.mae.MAE", "recipe": "r.yaml"}}
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    torch.save(ckpt, tmp_path / "run" / "checkpoints" / "last.ckpt")
    out = export_run(tmp_path / "run", tmp_path / "bb")
    loaded, meta = load_backbone(out)
    assert meta.steps == 7 and meta.method == "ssl_em.pretrain.mae.MAE" and meta.recipe == "r.yaml" and meta.img_size == 32
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))


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
