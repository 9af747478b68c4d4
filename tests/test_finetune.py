"""Fine-tuning: loss with ignore label, freezing, a short run that learns, export/load,
random-init twin, named errors for bad inputs, every recipe parses, the CLI end to end."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import timm
import torch
import zarr

from ssl_em.backbones import BackboneError, BackboneMeta
from ssl_em.data.labels import LabelError
from ssl_em.export import export_backbone
from ssl_em.finetune.cli import build_cli, finetune, run_argv
from ssl_em.finetune.data import LabeledSlicesDataModule
from ssl_em.finetune.heads import LinearProbe, UNETRHead, UNetHead
from ssl_em.finetune.model_folder import load_finetuned
from ssl_em.finetune.module import SegmentationModule

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "finetune"
SMALL_UNETR = functools.partial(UNETRHead, width=16, min_width=8, skip_width=8, stem_width=8)
SMALL_UNET = functools.partial(UNetHead, width=16, min_width=8, skip_width=8, stem_width=8)


# One intra-op thread for this module (fixture in conftest.py).


@pytest.fixture(scope="module")
def em():
    from ssl_em.synthetic import make_volume

    return make_volume(shape=(6, 64, 64), seed=1)


@pytest.fixture(scope="module")
def exported_backbone(tmp_path_factory):
    """A 'pretrained' backbone folder in ssl_em.export's format (random weights stand in)."""
    model = timm.create_model("test_vit", in_chans=1, num_classes=0, img_size=32, pretrained=False)
    out = tmp_path_factory.mktemp("bb") / "vit"
    meta = BackboneMeta("test_vit", model_args={"in_chans": 1, "img_size": 32}, img_size=32, patch_size=16, normalization={"mean": 0.4, "std": 0.2}, method="mae")
    return export_backbone(model, out, meta)


def test_ignore_label_is_ignored_by_the_loss():
    m = SegmentationModule("test_resnet", LinearProbe, num_classes=3, dice_weight=1.0)
    logits = torch.randn(2, 3, 8, 8)
    target = torch.randint(0, 3, (2, 8, 8))
    target[:, :4] = -1
    other = target.clone()
    other[:, :4] = -1
    base = m.loss(logits, target)
    logits2 = logits.clone()
    logits2[:, :, :4] = torch.randn(2, 3, 4, 8) * 10  # anything under the ignore label
    assert torch.allclose(m.loss(logits2, target), base)
    assert m.loss(logits, torch.full_like(target, -1)) == 0


def _fit(module, em, steps, callbacks=None):
    dm = LabeledSlicesDataModule(em.image, em.semantic, "0", None, tile_size=32, batch_size=2, tiles_per_epoch=8)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.fit(module, datamodule=dm)


def test_frozen_backbone_then_unfrozen(em):
    pl.seed_everything(0)
    frozen = SegmentationModule("test_resnet", SMALL_UNET, num_classes=3, tile_size=32, unfreeze_at_step=None)
    before = {k: v.clone() for k, v in frozen.backbone.state_dict().items()}
    head_before = [p.clone() for p in frozen.net.head.parameters()]
    _fit(frozen, em, 2)
    after = frozen.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a frozen backbone (BatchNorm statistics included) must not change"
    assert any(not torch.equal(a, b) for a, b in zip(head_before, frozen.net.head.parameters()))

    later = SegmentationModule("test_resnet", SMALL_UNET, num_classes=3, tile_size=32, unfreeze_at_step=1)
    w0 = next(later.backbone.parameters()).clone()
    seen = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, module, *args):
            seen.append(all(p.requires_grad for p in module.backbone.parameters()))

    _fit(later, em, 3, callbacks=[Record()])
    assert seen == [False, True, True]
    assert not torch.equal(w0, next(later.backbone.parameters()))


def test_layer_decay_groups():
    m = SegmentationModule("test_vit", SMALL_UNETR, num_classes=2, tile_size=32, unfreeze_at_step=0, layer_decay=0.5, lr=1.0, backbone_lr_scale=1.0)
    lrs = sorted({g["lr"] for g in m.configure_optimizers()["optimizer"].param_groups})
    assert lrs[-1] == 1.0 and lrs[0] < 0.1  # head at lr, lowest backbone layers decayed


def test_short_finetune_beats_untrained_and_exports(em, tmp_path):
    kw = dict(tile_size=32, batch_size=4, head=SMALL_UNET, unfreeze_at_step=0, lr=3e-3, accelerator="cpu")
    _, untrained = finetune("test_resnet", em.image, em.semantic, "0,1", "4,5", max_steps=0, **kw)
    model, trained = finetune("test_resnet", em.image, em.semantic, "0,1", "4,5", max_steps=25, out=tmp_path / "ft", **kw)
    assert trained["mean_iou"] > untrained["mean_iou"] + 0.1, (untrained, trained)
    net, meta = load_finetuned(tmp_path / "ft")
    assert meta.classes == ["0", "1", "2"] and meta.tile_size == 32 and meta.head["class_path"].endswith("UNetHead")
    assert meta.metrics["mean_iou"] == pytest.approx(trained["mean_iou"])
    x = torch.randn(1, 1, 32, 32)
    model.net.eval()
    with torch.no_grad():
        assert torch.allclose(net(x), model.net(x), atol=1e-5)


def test_random_init_twin_is_like_for_like(exported_backbone):
    pre = SegmentationModule(str(exported_backbone), LinearProbe, num_classes=2, tile_size=32)
    rnd = SegmentationModule(str(exported_backbone), LinearProbe, num_classes=2, tile_size=32, random_init=True)
    a, b = pre.backbone.state_dict(), rnd.backbone.state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], b["blocks.0.attn.qkv.weight"])
    assert pre.normalization.mean == rnd.normalization.mean == 0.4  # same data pipeline
    assert rnd.backbone_meta.method == "random-init"


def test_vit_is_resized_to_the_tile(exported_backbone, em):
    m = SegmentationModule(str(exported_backbone), LinearProbe, num_classes=3, tile_size=64)
    assert m.net(torch.randn(1, 1, 64, 64)).shape == (1, 3, 64, 64)
    assert m.backbone_meta.model_args["img_size"] == 64


def test_bad_inputs_give_named_errors(em, em_files, tmp_path):
    import tifffile

    tifffile.imwrite(tmp_path / "short.tif", em.semantic[:4], photometric="minisblack")
    with pytest.raises(LabelError, match=r"short\.tif.*\(4, 64, 64\).*image\.tif.*\(6, 64, 64\)"):
        LabeledSlicesDataModule(str(em_files / "image.tif"), str(tmp_path / "short.tif"), "0")
    bad = em.semantic.copy()
    bad[0, 0, :3] = [7, 9, 9]
    with pytest.raises(LabelError, match=r"label values \[7, 9\]"):
        LabeledSlicesDataModule(em.image, bad, "0", label_values=[0, 1, 2])
    with pytest.raises(BackboneError, match="not divisible by the patch size 16"):
        SegmentationModule("test_vit", LinearProbe, num_classes=3, tile_size=40)
    rgb = timm.create_model("test_resnet", in_chans=3, num_classes=0)
    with pytest.raises(BackboneError, match="3 input channels"):
        SegmentationModule(rgb, LinearProbe, num_classes=3)
    assert run_argv(["--config", str(RECIPES / "tiny_cpu.yaml"), "--images", str(em_files / "image.tif"), "--labels", str(em_files / "semantic.tif"), "--tile-size", "40"]) == 2


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_every_recipe_parses(recipe, em_files):
    backbone = "test_resnet" if "cnn" in recipe else "test_vit"
    labels = "semantic.tif"
    cli = build_cli(["--config", str(RECIPES / recipe), "--backbone", backbone, "--images", str(em_files / "image.tif"), "--labels", str(em_files / labels), "--train-slices", "0", "--val-slices", "5"])
    assert cli.model.hparams.num_classes == cli.datamodule.num_classes
    assert cli.model.hparams.tile_size == cli.datamodule.tile_size


def test_cli_end_to_end_then_predict(em_files, tmp_path):
    from ssl_em.cli import main

    out = tmp_path / "model"
    argv = ["finetune", "--config", str(RECIPES / "tiny_cpu.yaml"), "--images", str(em_files / "image.tif"), "--labels", str(em_files / "semantic.tif"), "--train-slices", "0,1", "--val-slices", "4-5", "--max-steps", "2", "--out", str(out)]
    assert main(argv) == 0
    assert (out / "model.safetensors").is_file() and (out / "ssl_em_finetuned.json").is_file()
    assert main(["predict", str(out), str(em_files / "image.tif"), "--out", str(tmp_path / "p.zarr"), "--slab", "3", "--no-progress"]) == 0
    assert main(["evaluate", str(tmp_path / "p.zarr"), str(em_files / "semantic.tif"), "--slices", "4-5"]) == 0

    # Two processes (Lightning Fabric, gloo on CPU) share the slabs of all three planes and
    # write exactly what one process writes.
    predict = ["predict", str(out), str(em_files / "image.tif"), "--slab", "2", "--planes", "xy,xz,yz", "--no-progress", "--accelerator", "cpu"]
    assert main(predict + ["--out", str(tmp_path / "one.zarr")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "ssl_em.cli", *predict, "--devices", "2", "--out", str(tmp_path / "two.zarr")], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    one, two = zarr.open_group(str(tmp_path / "one.zarr"), mode="r"), zarr.open_group(str(tmp_path / "two.zarr"), mode="r")
    for name in ("0", "labels/semantic/0", "planes/xz/0", "planes/yz/0"):
        np.testing.assert_array_equal(two[name][:], one[name][:])
    assert two.attrs["ssl_em"]["complete"]
    for plane, n in zip(("xy", "xz", "yz"), one["0"].shape[1:]):
        by = sorted(f.read_text() for f in (tmp_path / "two.zarr" / ".progress" / plane).iterdir())
        assert len(by) == -(-n // 2) and set(by) == {"0", "1"}  # every slab once, by both ranks


def test_instance_task_end_to_end(em, tmp_path):
    """Instance ids -> background/boundary/interior training -> watershed in predict -> scores."""
    import tifffile

    from ssl_em.cli import main

    tifffile.imwrite(tmp_path / "image.tif", em.image, photometric="minisblack")
    tifffile.imwrite(tmp_path / "cells.tif", em.cells, photometric="minisblack")
    _, metrics = finetune("test_resnet", str(tmp_path / "image.tif"), str(tmp_path / "cells.tif"), "0,1", "5", task="instance", max_steps=3, tile_size=32, batch_size=2, head=SMALL_UNET, unfreeze_at_step=0, accelerator="cpu", out=tmp_path / "inst")
    assert {"ap50", "voi", "adapted_rand_error", "iou/boundary"} <= set(metrics)
    assert main(["predict", str(tmp_path / "inst"), str(tmp_path / "image.tif"), "--out", str(tmp_path / "i.zarr"), "--no-progress"]) == 0
    assert (tmp_path / "i.zarr" / "labels" / "instances" / "0").is_dir()
    assert main(["evaluate", str(tmp_path / "i.zarr"), str(tmp_path / "cells.tif"), "--task", "instance"]) == 0
    from ssl_em.inference.evaluate import evaluate

    assert evaluate(str(tmp_path / "i.zarr"), str(tmp_path / "cells.tif"))["task"] == "instance"  # read from the prediction
    assert evaluate(str(tmp_path / "i.zarr"), str(tmp_path / "cells.tif"), task="semantic")["task"] == "semantic"
    argv = ["predict", str(tmp_path / "inst"), str(tmp_path / "image.tif"), "--out", str(tmp_path / "i3.zarr"), "--no-progress", "--instances", "3d"]
    assert main(argv + ["--seed-threshold", "0.9"]) == 0
    assert '"seed_threshold": 0.9' in (tmp_path / "i3.zarr" / ".zattrs").read_text()


@pytest.mark.realdata
def test_isbi_slices_load_with_a_label_mapping(shared_data):
    """Real EM through open_volume: ISBI 2012 PNG folders, membrane 0 / interior 255."""
    isbi = shared_data / "isbi2012" / "train"
    dm = LabeledSlicesDataModule(str(isbi / "image"), str(isbi / "label"), "0,1", "20-29", classes=["interior", "membrane"], label_values=[255, 0], tile_size=256)
    assert dm.num_classes == 2 and dm._train[0].shape == (2, 512, 512)
    assert 0.0 <= dm._train[0].min() and dm._train[0].max() <= 1.0
    assert set(np.unique(dm._val[1])) == {0, 1} and 0.05 < (dm._val[1] == 1).mean() < 0.5


def test_random_init_backbone_trains_at_full_lr_by_default():
    """A random backbone has nothing to preserve; slowing it 10x would handicap the baseline."""
    top = {}
    for random_init in (False, True):
        m = SegmentationModule("test_vit", SMALL_UNETR, num_classes=2, tile_size=32, unfreeze_at_step=0, lr=1.0, random_init=random_init)
        top[random_init] = max(g["lr"] for g in m.configure_optimizers()["optimizer"].param_groups[1:])  # [0] is the head
    assert top == {False: pytest.approx(0.1), True: pytest.approx(1.0)}


def test_scored_on_the_device_the_trainer_used(em, monkeypatch):
    """Lightning's teardown moves the module to the CPU; scoring must use the trainer's device
    (here the CPU as well: what is checked is that the trainer's device is the one passed)."""
    import ssl_em.finetune.cli as cli

    seen = {}
    score = cli.score_val_slices
    monkeypatch.setattr(cli, "score_val_slices", lambda model, dm, **kw: (seen.update(kw), score(model, dm, **kw))[1])
    monkeypatch.setattr(pl.Trainer, "fit", lambda self, *a, **k: seen.setdefault("root", self.strategy.root_device))
    finetune("test_resnet", em.image, em.semantic, "0", "4", max_steps=1, tile_size=32, batch_size=2, head=SMALL_UNET, accelerator="cpu")
    assert seen["device"] == seen["root"]


def test_bf16_predictions_agree_with_float32(em):
    """A fine-tuned network predicts the same labels under bf16 autocast as in float32 (Dice
    of the label maps >= 0.99 per class), and the run trained at the precision it was given."""
    from ssl_em.inference.window import predict_plane
    from ssl_em.precision import BF16, FLOAT32, choose

    model, _ = finetune("test_resnet", em.image, em.semantic, "0,1", "4,5", max_steps=25, tile_size=32, batch_size=4, head=SMALL_UNET, unfreeze_at_step=0, lr=3e-3,
                        accelerator="cpu", precision=BF16)
    net, bf16 = model.net.eval(), choose("cpu", BF16)
    for z in (4, 5):
        img = ((em.image[z].astype(np.float32) / 255) - model.normalization.mean) / model.normalization.std
        a = predict_plane(net, img, 32, 8, precision=FLOAT32).argmax(0)
        b = predict_plane(net, img, 32, 8, precision=bf16).argmax(0)
        for k in np.unique(a):
            dice = 2 * ((a == k) & (b == k)).sum() / ((a == k).sum() + (b == k).sum())
            assert dice >= 0.99, (z, k, dice)


def test_precision_is_chosen_once_and_the_flag_overrides(em_files, capsys):
    from ssl_em.finetune.cli import chosen_precision
    from ssl_em.precision import FP32, choose

    base = ["--config", str(RECIPES / "tiny_cpu.yaml"), "--images", str(em_files / "image.tif"), "--labels", str(em_files / "semantic.tif"), "--train-slices", "0", "--val-slices", "5"]
    auto = build_cli(base + ["--trainer.accelerator", "cpu"])
    assert auto.config.trainer.precision == choose("cpu").lightning == chosen_precision(auto).lightning
    forced = build_cli(base + ["--precision", FP32, "--channels_last", "true"])
    assert forced.config.trainer.precision == FP32 and forced.trainer.precision == FP32
    assert chosen_precision(forced).channels_last and "as requested" in chosen_precision(forced).why
