"""Semi-supervised fine-tuning: pseudo-labels, the consistency loss, the mean teacher, which
slices are unlabeled, and the option through `finetune`, `ssl-em finetune` and the benchmark."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from ssl_em.data.labels import LabelError
from ssl_em.finetune.data import REST, LabeledSlicesDataModule, UnlabeledTiles
from ssl_em.finetune.heads import UNetHead
from ssl_em.finetune.module import SegmentationModule
from ssl_em.finetune.semi import consistency_loss, pseudo_labels, sigmoid_rampup

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "finetune"
SMALL_UNET = functools.partial(UNetHead, width=16, min_width=8, skip_width=8, stem_width=8)


@pytest.fixture(scope="module")
def em():
    from ssl_em.synthetic import make_volume

    return make_volume(shape=(6, 64, 64), seed=1)


def test_pseudo_labels_keep_only_confident_pixels():
    # Two classes, logits (0, d): p(class 1) = sigmoid(d).
    d = torch.tensor([[3.0, -3.0], [0.5, -0.1]])  # p1 = 0.953, 0.047, 0.622, 0.475
    logits = torch.stack([torch.zeros_like(d), d])[None]  # (1, 2, 2, 2)
    assert pseudo_labels(logits, 0.9).tolist() == [[[1, 0], [-1, -1]]]
    assert pseudo_labels(logits, 0.5).tolist() == [[[1, 0], [1, 0]]]


def test_consistency_loss_ignores_unconfident_pixels():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, 4, 4, generator=g)
    pseudo = torch.randint(0, 3, (2, 4, 4), generator=g)
    pseudo[:, :2] = -1  # unconfident: half the pixels
    loss = consistency_loss(student, pseudo)
    # Reference: cross-entropy summed over the confident pixels, over all 32 pixels.
    logp = student.log_softmax(1)
    keep = pseudo >= 0
    ref = -sum(float(logp[b, pseudo[b, y, x], y, x]) for b, y, x in zip(*keep.nonzero(as_tuple=True))) / pseudo.numel()
    assert float(loss) == pytest.approx(ref, rel=1e-5)
    changed = student.clone()
    changed[:, :, :2] = torch.randn(2, 3, 2, 4, generator=g) * 10  # anything on the unconfident pixels
    assert float(consistency_loss(changed, pseudo)) == pytest.approx(float(loss), rel=1e-6)
    assert float(consistency_loss(student, torch.full_like(pseudo, -1))) == 0.0


def test_sigmoid_rampup():
    assert sigmoid_rampup(0, 10) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(5, 10) == pytest.approx(math.exp(-1.25))
    assert sigmoid_rampup(10, 10) == sigmoid_rampup(99, 10) == sigmoid_rampup(0, 0) == 1.0


def _dm(em, **kw):
    return LabeledSlicesDataModule(em.image, em.semantic, "0", "4,5", tile_size=32, batch_size=2, tiles_per_epoch=8, **kw)


def test_unlabeled_tiles_never_come_from_training_or_scored_slices():
    """Each slice z of the image is the constant z: a tile's value names its slice."""
    image = np.repeat(np.arange(8, dtype=np.float32)[:, None, None], 40, 1).repeat(40, 2)
    labels = np.zeros((8, 40, 40), np.int64)
    labels[:, :20] = 1
    dm = LabeledSlicesDataModule(image, labels, "0,3", "5-6", tile_size=32, batch_size=4, tiles_per_epoch=64, unlabeled_slices=REST)
    assert dm.unlabeled_slices == [1, 2, 4, 7]
    stretched = {z: float(np.clip((z - dm.stats.lo) / (dm.stats.hi - dm.stats.lo), 0, 1)) for z in range(8)}
    seen = set()
    for batch in dm.train_dataloader():
        assert batch["unlabeled"].shape == (4, 1, 32, 32) and batch["image"].shape == (4, 1, 32, 32)
        for tile in batch["unlabeled"]:
            assert tile.min() == tile.max()  # one slice per tile
            seen |= {z for z, v in stretched.items() if v == pytest.approx(float(tile[0, 0, 0]), abs=1e-6)}
    assert seen and seen <= {1, 2, 4, 7}, seen
    # Explicit slices that train or are scored are refused; none left is refused too.
    for spec, what in (("1,3", "training"), ("2,5", "validation")):
        with pytest.raises(LabelError, match=what):
            LabeledSlicesDataModule(image, labels, "0,3", "5-6", tile_size=32, unlabeled_slices=spec)
    with pytest.raises(LabelError, match="no slice"):
        LabeledSlicesDataModule(image[:3], labels[:3], "0,1", "2", tile_size=32, unlabeled_slices=REST)
    assert LabeledSlicesDataModule(image, labels, "0,3", "5-6", tile_size=32, unlabeled_slices="7").unlabeled_slices == [7]


def test_unlabeled_stream_leaves_the_labeled_tiles_as_they_were(em):
    pl.seed_everything(3)
    plain = [b["image"] for b in _dm(em).train_dataloader()]
    pl.seed_everything(3)
    mixed = [b["image"] for b in _dm(em, unlabeled_slices=REST).train_dataloader()]
    assert all(torch.equal(a, b) for a, b in zip(plain, mixed, strict=True))
    # The labeled tiles' augmentations keep their streams; the unlabeled ones have their own.
    m = SegmentationModule("test_resnet", SMALL_UNET, num_classes=3, tile_size=32, semi_supervised=True)
    assert [a.rng.stream for a in (m.geometric, m.warp, *m.intensity)] == ["FlipRot90", "RandomWarp", "BrightnessContrast", "Gamma", "GaussianNoise", "GaussianBlur", "Stripes"]
    assert {a.rng.stream for a in (m.unlabeled_geometric, m.unlabeled_warp, *m.unlabeled_intensity)} == {f"{n}.unlabeled" for n in ("FlipRot90", "RandomWarp", "BrightnessContrast", "Gamma", "GaussianNoise", "GaussianBlur", "Stripes")}
    tiles = UnlabeledTiles(_dm(em).images_volume, [1, 2], _dm(em).stats, 80, 3, seed=0)  # larger than the 64 px slice: padded
    assert [t["unlabeled"].shape for t in tiles] == [(1, 80, 80)] * 3


def test_teacher_is_the_ema_of_the_student(em):
    """Three optimizer steps; the teacher equals a hand-run EMA (momentum 0.9) of the
    student's weights and BatchNorm statistics after each step."""
    pl.seed_everything(0)
    m = SegmentationModule("test_resnet", SMALL_UNET, num_classes=3, tile_size=32, unfreeze_at_step=0, semi_supervised=True, teacher_momentum=0.9, confidence=0.0)
    reference = {k: v.clone() for k, v in m.net.state_dict().items()}
    students = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, module, *args):
            students.append({k: v.clone() for k, v in module.net.state_dict().items()})

    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()])
    trainer.fit(m, datamodule=_dm(em, unlabeled_slices=REST))
    assert len(students) == 3
    for s in students:
        reference = {k: 0.9 * reference[k] + 0.1 * v if v.is_floating_point() else v for k, v in s.items()}
    teacher = m.teacher.state_dict()
    for k, v in reference.items():
        torch.testing.assert_close(teacher[k], v, rtol=1e-5, atol=1e-6, msg=k)
    key = next(k for k, v in students[-1].items() if v.is_floating_point() and not torch.equal(v, students[0][k]))
    assert not torch.equal(teacher[key], students[-1][key])  # it lags behind the student
    m.train()
    assert not m.teacher.training  # predicts with its averaged BatchNorm statistics
    assert trainer.callback_metrics["train/confident"] == 1.0  # threshold 0: every pixel labeled (warped-in border aside)


def test_consistency_term_trains_the_student_on_the_teacher_labels(em):
    """loss = supervised + ramped weight x consistency, where the consistency target is the
    teacher's labels of the weak view warped exactly as the student's strong view is."""
    pl.seed_everything(0)
    m = SegmentationModule("test_resnet", SMALL_UNET, num_classes=3, tile_size=32, unfreeze_at_step=0, semi_supervised=True, confidence=0.0, consistency_weight=2.0, consistency_rampup=0.0)
    dm = _dm(em, unlabeled_slices=REST)
    m.train()
    batch = m.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    seen = {}
    m.unlabeled_warp.p = 1.0  # always warp, so the labels must move with the image
    m.unlabeled_warp.register_forward_hook(lambda mod, args, out: seen.update(labels_in=args[1].clone(), labels_out=out[1].clone()))
    m.unlabeled_intensity.register_forward_hook(lambda mod, args, out: seen.update(strong=out.clone()))
    loss = m.training_step(batch, 0)
    with torch.no_grad():
        assert torch.equal(seen["labels_in"], pseudo_labels(m.teacher(batch["unlabeled"]), 0.0))  # the teacher labelled the weak view
        assert not torch.equal(seen["labels_out"], seen["labels_in"])
        logits = m(torch.cat([batch["image"], seen["strong"]]))
        n = len(batch["image"])
        expected = m.loss(logits[:n], batch["target"]) + 2.0 * consistency_loss(logits[n:], seen["labels_out"])
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert m.consistency_weight_now() == 2.0 and loss.requires_grad


@pytest.mark.parametrize("backbone, random_init", [("test_resnet", True), ("test_vit", False)])
def test_finetune_semi_supervised_any_backbone(em, backbone, random_init):
    head = SMALL_UNET if backbone == "test_resnet" else None
    model, metrics = finetune_semi(em, backbone, random_init, head)
    assert model.teacher is not None and "mean_iou" in metrics
    # Off by default: no teacher, no unlabeled tiles.
    from ssl_em.finetune.cli import finetune

    plain, _ = finetune(backbone, em.image, em.semantic, "0", "4,5", max_steps=1, tile_size=32, batch_size=2, head=head, accelerator="cpu", random_init=random_init, holdout=0)
    assert plain.teacher is None


def finetune_semi(em, backbone, random_init, head):
    from ssl_em.finetune.cli import finetune

    return finetune(backbone, em.image, em.semantic, "0", "4,5", max_steps=2, tile_size=32, batch_size=2, head=head, accelerator="cpu",
                    random_init=random_init, unfreeze_at_step=0, semi_supervised=True)


def test_semi_supervised_needs_unlabeled_slices_and_the_other_way_round(em):
    with pytest.raises(ValueError, match="semi-supervised"):
        _fit_one(SegmentationModule("test_resnet", SMALL_UNET, num_classes=3, tile_size=32, semi_supervised=True), _dm(em))
    with pytest.raises(ValueError, match="semi-supervised"):
        _fit_one(SegmentationModule("test_resnet", SMALL_UNET, num_classes=3, tile_size=32), _dm(em, unlabeled_slices="1"))


def _fit_one(module, dm):
    pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False).fit(module, datamodule=dm)


def test_cli_semi_supervised(em_files, tmp_path, capsys):
    from ssl_em.cli import main
    from ssl_em.finetune.cli import build_cli

    base = ["--config", str(RECIPES / "tiny_cpu.yaml"), "--images", str(em_files / "image.tif"), "--labels", str(em_files / "semantic.tif"), "--train-slices", "0,1", "--val-slices", "4-5"]
    cli = build_cli(base + ["--semi-supervised"])
    assert cli.model.teacher is not None and cli.datamodule.unlabeled_slices == [2, 3]  # neither trained on nor scored
    cli = build_cli(base + ["--semi-supervised", "--unlabeled-slices", "3"])
    assert cli.datamodule.unlabeled_slices == [3]
    assert build_cli(base).model.teacher is None and build_cli(base).datamodule.unlabeled_slices == []
    assert main(["finetune", *base, "--semi-supervised", "--max-steps", "2", "--out", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "semi-supervised: a mean teacher labels tiles of 2 unlabeled slices (2..3)" in out
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert main(["finetune", *base, "--unlabeled-slices", "4", "--semi-supervised"]) == 2  # a scored slice
    assert main(["finetune", *base, "--unlabeled-slices", "3", "--max-steps", "1"]) == 2  # unlabeled slices but no --semi-supervised
    assert "needs both --semi-supervised and unlabeled slices" in capsys.readouterr().err
    assert main(["finetune", "--help"]) == 0 and "--semi-supervised" in capsys.readouterr().out


def test_benchmark_flag_uses_only_unlabeled_pool_slices_and_records_it(tmp_path, monkeypatch):
    import ssl_em.finetune.benchmark as bench
    import ssl_em.finetune.cli as ft_cli
    from ssl_em.cli import main
    from ssl_em.finetune.benchmark_report import read_rows

    calls = []

    def fake_finetune(backbone, images, labels, train, val, **kw):
        calls.append((tuple(train), tuple(val), kw.get("semi_supervised"), kw.get("unlabeled_slices")))
        return None, {"mean_iou": 0.5}

    monkeypatch.setattr(ft_cli, "finetune", fake_finetune)
    monkeypatch.setattr(bench, "check_backbone", lambda b: None)
    monkeypatch.setattr(bench, "check_data", lambda *a: None)
    argv = ["benchmark", "label-efficiency", "--backbones", "ckpt/mae", "--images", "i", "--labels", "l", "--pool", "0-3",
            "--val-slices", "4-5", "--budgets", "1,2", "--seeds", "0", "--semi-supervised", "--out", str(tmp_path)]
    assert main(argv) == 0
    for train, val, semi, unlabeled in calls:
        if len(train) < 4:
            assert semi and sorted(unlabeled) == sorted(set(range(4)) - set(train)), (train, unlabeled)
            assert not set(unlabeled) & {4, 5}  # never the scored slices
        else:  # the ceiling: every pool slice is labeled, nothing is left unlabeled
            assert not semi and not unlabeled
    settings = {(r["arm"], r["budget"]): json.loads(r["settings"]) for r in read_rows(tmp_path / "results.csv")}
    assert settings[("mae", "1")]["semi_supervised"] is True
    assert settings[("U-Net from scratch (resnet18)", "4")]["semi_supervised"] is False
    # Resuming the folder without the flag would mix two protocols in one table: refused.
    assert main(argv[:-3] + ["--out", str(tmp_path)]) == 2
