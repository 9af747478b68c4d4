"""The fine-tuning protocol: class-balanced tiles, the step schedule, the held-out band and
the best-by-validation weights, the joint warp of image and labels."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from ssl_em.data.labels import IGNORE
from ssl_em.finetune.data import LabeledSlicesDataModule, TrainTiles, split_holdout
from ssl_em.finetune.heads import UNetHead
from ssl_em.finetune.schedule import KeepBestWeights, StepSchedule

SMALL_UNET = functools.partial(UNetHead, width=16, min_width=8, skip_width=8, stem_width=8)


@pytest.fixture(scope="module")
def em():
    from ssl_em.synthetic import make_volume

    return make_volume(shape=(6, 64, 64), seed=1)


def _centre_rate(class_balance: float, n: int = 600) -> float:
    """Fraction of tiles whose centre is the rare class (a 12 x 12 blob, 3.5% of the pixels)."""
    targets = np.zeros((2, 64, 64), np.int64)
    targets[0, 20:32, 26:38] = 1
    targets[1, :, :4] = IGNORE
    ds = TrainTiles(np.zeros(targets.shape, np.float32), targets, 16, n, class_balance=class_balance, seed=0)
    return float(np.mean([tile["target"][8, 8].item() == 1 for tile in ds]))


def test_class_balanced_tiles_show_the_rare_class_at_the_requested_rate():
    # p = 0.6: 0.6 x 1/2 (balanced draws pick the rare class half the time) + 0.4 x 3.5% ~ 0.31.
    assert 0.24 < _centre_rate(0.6) < 0.38
    assert _centre_rate(0.0) < 0.08  # uniform tiles: about its pixel share


def test_step_schedule_grows_with_labels_within_its_bounds(em):
    sched = StepSchedule(min_steps=100, steps_per_mpx=1000.0, max_steps=400)
    pixels = [0, 10**5, 2 * 10**5, 10**6, 10**7]
    steps = [sched(p) for p in pixels]
    assert steps == sorted(steps) and steps[0] == 100 and steps[-1] == 400 and steps[1] < steps[2]
    one, two = (LabeledSlicesDataModule(em.image, em.semantic, s, holdout=0.25).labeled_pixels for s in ("0", "0,1"))
    assert two == 2 * one == 2 * 48 * 64 and sched(two * 10) > sched(one * 10)


def test_holdout_band_is_cut_from_the_labeled_slices_only(em):
    dm = LabeledSlicesDataModule(em.image, em.semantic, "0,1", "4,5", tile_size=32, holdout=0.25)
    assert dm._train[0].shape == (2, 48, 64) and dm._holdout[1].shape == (2, 16, 64)
    whole = LabeledSlicesDataModule(em.image, em.semantic, "0,1", "4,5")._train
    assert np.array_equal(dm._holdout[1], whole[1][:, 48:]) and np.array_equal(dm._train[1], whole[1][:, :48])
    val = next(iter(dm.val_dataloader()))["image"]
    assert np.allclose(val[0, 0, :16].numpy(), dm._holdout[0][0, :, :32])  # the band, not the scored slices 4, 5
    (tr, _), none = split_holdout(dm._train[0], dm._train[1], 0.0)
    assert none is None and tr is dm._train[0]


def test_warmup_then_cosine():
    """Fine-tuning's lr: the shared schedule down to COSINE_FLOOR (1%)."""
    from ssl_em.finetune.module import COSINE_FLOOR
    from ssl_em.schedules import warmup_cosine

    def f(s):
        return warmup_cosine(s, 10, 100, COSINE_FLOOR)

    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.505) and f(100) == pytest.approx(0.01) and f(60) < f(40)


class _ScriptedKeepBest(KeepBestWeights):
    """Reports scripted validation losses (best at the 2nd check) and remembers the last weights."""

    losses = [3.0, 1.0, 2.0, 4.0]

    def __init__(self, monitor: str = "val/loss") -> None:
        super().__init__(monitor)
        self.checks, self.last_state = 0, None
        _ScriptedKeepBest.instance = self

    def score(self, trainer) -> float:
        assert super().score(trainer) is not None  # the real validation loss is there
        self.checks += 1
        return self.losses[self.checks - 1]

    def on_fit_end(self, trainer, pl_module) -> None:
        self.last_state = {k: v.clone() for k, v in pl_module.state_dict().items()}
        super().on_fit_end(trainer, pl_module)


def test_the_best_weights_by_validation_are_what_is_exported(em, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import ssl_em.finetune.cli as ft_cli

    monkeypatch.setattr(ft_cli, "KeepBestWeights", _ScriptedKeepBest)
    _, metrics = ft_cli.finetune("test_resnet", em.image, em.semantic, "0,1", "4", max_steps=8, validations=4, holdout=0.25, tile_size=32,
                                 batch_size=2, head=SMALL_UNET, unfreeze_at_step=0, lr=3e-3, accelerator="cpu", out=tmp_path / "ft")  # fmt: skip
    keep = _ScriptedKeepBest.instance
    assert keep.checks == 4 and metrics["best_step"] == keep.best_step == 4 and metrics["steps"] == 8
    exported = load_file(str(tmp_path / "ft" / "model.safetensors"))
    best = {k.removeprefix("net."): v for k, v in keep.best_state.items() if k.startswith("net.")}
    last = {k.removeprefix("net."): v for k, v in keep.last_state.items() if k.startswith("net.")}
    assert exported.keys() == best.keys()
    assert all(torch.equal(exported[k], best[k]) for k in best)
    assert not all(torch.equal(exported[k], last[k]) for k in last)  # the last weights were not kept


def test_warp_moves_labels_with_the_image():
    from ssl_em.data.augment import RandomWarp

    torch.manual_seed(0)
    target = torch.zeros(4, 32, 32, dtype=torch.long)
    target[:, 8:20, 10:24] = 1
    image = target[:, None].float()  # the image is its own label: a warped pair must still agree
    warped, t = RandomWarp(rotate=20, scale=0.1, elastic=3.0, p=1.0)(image, target)
    inside = t != IGNORE
    assert not torch.equal(t, target) and inside.float().mean() > 0.8
    agree = ((warped[:, 0] > 0.5).long() == t)[inside].float().mean()
    assert agree > 0.97
