"""Metrics against scikit-image and hand-worked cases; the evaluate command end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from skimage.metrics import adapted_rand_error, variation_of_information

from ssl_em.inference.metrics import instance_iou, instance_scores, match_counts, semantic_scores


def _random_labels(rng, shape=(40, 50), n=6):
    # blocky random segmentations with a few ids, 0 included
    small = rng.integers(0, n, (shape[0] // 5, shape[1] // 5))
    return np.kron(small, np.ones((5, 5), int))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_voi_and_rand_match_skimage(seed):
    rng = np.random.default_rng(seed)
    gt, pred = _random_labels(rng), _random_labels(rng)
    s = instance_scores(pred, gt)
    split, merge = variation_of_information(gt, pred, ignore_labels=(0,))
    assert s["voi_split"] == pytest.approx(split) and s["voi_merge"] == pytest.approx(merge)
    assert s["adapted_rand_error"] == pytest.approx(adapted_rand_error(gt, pred, ignore_labels=(0,))[0])


def test_perfect_instance_scores():
    rng = np.random.default_rng(3)
    gt = _random_labels(rng)
    relabelled = np.where(gt > 0, gt + 10, 0)  # ids need not agree, only the partition
    s = instance_scores(relabelled, gt)
    assert s["ap50"] == 1 and s["map"] == 1 and s["f1_50"] == 1
    assert s["voi"] == pytest.approx(0, abs=1e-9) and s["adapted_rand_error"] == pytest.approx(0, abs=1e-9)


def test_ap_hand_worked():
    gt = np.zeros((20, 20), int)
    gt[0:10, 0:10] = 1  # matched exactly
    gt[10:20, 10:20] = 2  # predicted with IoU 50/100 = 0.5: TP at 0.5, not at 0.75
    gt[0:4, 15:19] = 3  # missed: FN
    pred = np.zeros_like(gt)
    pred[0:10, 0:10] = 7
    pred[10:20, 10:15] = 8
    pred[15:18, 0:3] = 9  # spurious: FP
    iou, gt_ids, pred_ids = instance_iou(pred, gt)
    assert iou.shape == (3, 3) and iou[0, 0] == 1 and iou[1, 1] == pytest.approx(0.5)
    assert match_counts(iou, 0.5) == (2, 1, 1)
    assert match_counts(iou, 0.75) == (1, 2, 2)
    s = instance_scores(pred, gt)
    assert s["ap50"] == pytest.approx(2 / 4)  # TP / (TP + FP + FN)
    assert s["ap75"] == pytest.approx(1 / 5)
    assert s["f1_50"] == pytest.approx(4 / 6)
    expected_map = np.mean([2 / 4] + [1 / 5] * 9)  # 0.5: 2 TP; 0.55..0.95: 1 TP
    assert s["map"] == pytest.approx(expected_map)


def test_ap_matching_is_one_to_one():
    gt = np.zeros((10, 10), int)
    gt[:, :] = 1
    pred = np.zeros_like(gt)
    pred[:, :6], pred[:, 6:] = 1, 2  # two predictions overlap one truth; only one may match
    assert match_counts(instance_iou(pred, gt)[0], 0.5) == (1, 1, 0)


def test_semantic_iou_dice_with_ignore():
    gt = np.array([[0, 0, 1, 1], [1, 1, -1, -1]])
    pred = np.array([[0, 1, 1, 1], [1, 0, 0, 0]])
    s = semantic_scores(pred, gt, 2, ignore_index=-1)
    # class 0: tp 1, fp 1 (pixel (1,1)), fn 1 (pixel (0,1)) -> IoU 1/3, Dice 2/4
    # class 1: tp 3 ((0,2),(0,3),(1,0)), fp 1, fn 1 -> IoU 3/5, Dice 6/8
    assert s["per_class"]["0"]["iou"] == pytest.approx(1 / 3) and s["per_class"]["0"]["dice"] == pytest.approx(0.5)
    assert s["per_class"]["1"]["iou"] == pytest.approx(3 / 5) and s["per_class"]["1"]["dice"] == pytest.approx(0.75)
    assert s["accuracy"] == pytest.approx(4 / 6)


def test_evaluate_command(tmp_path, capsys):
    import tifffile

    from ssl_em.cli import main

    def write(name, a):
        tifffile.imwrite(tmp_path / name, a, photometric="minisblack")

    rng = np.random.default_rng(0)
    gt = np.stack([_random_labels(rng) for _ in range(4)]).astype(np.uint16)
    write("gt.tif", gt)
    write("pred.tif", gt)
    assert main(["evaluate", str(tmp_path / "pred.tif"), str(tmp_path / "gt.tif"), "--task", "instance", "--json", str(tmp_path / "s.json")]) == 0
    scores = json.loads((tmp_path / "s.json").read_text())
    assert scores["ap50"] == 1 and scores["voi"] == pytest.approx(0, abs=1e-9)
    assert "adapted_rand_error" in capsys.readouterr().out
    # semantic with a label mapping: GT values 0/255, prediction classes 0/1
    sem = (gt[:, :, :] > 2).astype(np.uint8)
    write("sgt.tif", sem * 255)
    write("spred.tif", sem)
    assert main(["evaluate", str(tmp_path / "spred.tif"), str(tmp_path / "sgt.tif"), "--label-values", "0,255", "--slices", "1-2", "--json", str(tmp_path / "t.json")]) == 0
    assert json.loads((tmp_path / "t.json").read_text())["mean_iou"] == pytest.approx(1)
    write("bad.tif", sem[:2])
    assert main(["evaluate", str(tmp_path / "bad.tif"), str(tmp_path / "sgt.tif")]) == 2
    err = capsys.readouterr().err
    assert "bad.tif" in err and "sgt.tif" in err and "(2, 40, 50)" in err


def test_fine_tuning_validation_counts_like_evaluation():
    """The training module's validation matrix (torchmetrics, summed over ranks) and
    evaluation's (numpy) count the same pixels, ignore label included; IoU comes from one
    function for both."""
    import torch
    from torchmetrics.classification import MulticlassConfusionMatrix

    from ssl_em.inference.metrics import confusion_matrix, iou_dice

    rng = np.random.default_rng(0)
    pred, target = rng.integers(0, 3, (2, 4, 16, 16)), rng.integers(-1, 3, (2, 4, 16, 16))
    target[target == 2] = -1  # class 2 is never true: predicted only, so its IoU is 0, not NaN
    metric = MulticlassConfusionMatrix(3, ignore_index=-1, validate_args=False)
    for p, t in zip(pred, target):  # two validation batches
        metric.update(torch.from_numpy(p), torch.from_numpy(t))
    ours = confusion_matrix(pred, target, 3, ignore_index=-1)
    assert np.array_equal(metric.compute().numpy(), ours)
    iou, dice = iou_dice(ours)
    scores = semantic_scores(pred.ravel(), target.ravel(), 3, ignore_index=-1)
    assert iou[2] == 0 and [scores["per_class"][str(k)]["iou"] for k in range(3)] == pytest.approx(list(iou))
    assert np.isnan(iou_dice(np.zeros((2, 2)))[0]).all()  # nothing seen: NaN, not 0
