"""Segmentation metrics: semantic IoU / Dice per class, instance AP, VOI, adapted Rand.

Semantic scores come from one confusion matrix over pixels whose ground truth is not the
ignore label. Instance scores:

- average precision in the StarDist/Cellpose sense, AP(t) = TP / (TP + FP + FN), where a
  predicted and a true instance match when their IoU >= t; matching is one-to-one and
  optimal (Hungarian on IoU, scipy), reported at 0.5, 0.75 and averaged over 0.5:0.95;
- matched F1 at IoU 0.5: 2 TP / (2 TP + FP + FN);
- panoptic quality (Kirillov et al. 2019) of the instances: PQ = SQ x RQ, where a match is
  IoU > 0.5 (then unique), SQ is the mean IoU of the matches and RQ = TP / (TP + FP/2 + FN/2)
  (the F1 above, with the paper's strict >); 0 when nothing matches (panopticapi's convention);
- variation of information (split = H(pred | GT), over-segmentation; merge = H(GT | pred)) and the adapted
  Rand error, both from scikit-image, with 0 in the ground truth ignored as boundary.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

AP_THRESHOLDS = tuple(np.round(np.arange(0.5, 1.0, 0.05), 2))


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_index: int | None = None) -> np.ndarray:
    """(K, K) int64 counts, rows = ground truth, columns = prediction."""
    pred, gt = np.asarray(pred).ravel().astype(np.int64), np.asarray(gt).ravel().astype(np.int64)
    keep = (gt != ignore_index) if ignore_index is not None else np.ones(gt.shape, bool)
    keep &= (gt >= 0) & (gt < num_classes)
    return np.bincount(gt[keep] * num_classes + np.clip(pred[keep], 0, num_classes - 1), minlength=num_classes**2).reshape(num_classes, num_classes)


def iou_dice(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class IoU and Dice (= F1), each (K,) float64, from a (K, K) confusion matrix (rows =
    ground truth, columns = prediction); NaN for a class absent from both. Evaluation and
    fine-tuning's validation IoU both come from here."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
    present = (tp + fp + fn) > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(present, tp / (tp + fp + fn), np.nan), np.where(present, 2 * tp / (2 * tp + fp + fn), np.nan)


def semantic_scores(pred: np.ndarray, gt: np.ndarray, num_classes: int | None = None, ignore_index: int | None = None, classes: list[str] | None = None) -> dict:
    """Per-class IoU and Dice (= F1), their means over classes present, and pixel accuracy."""
    if num_classes is None:
        valid = gt[gt != ignore_index] if ignore_index is not None else gt
        num_classes = int(max(np.max(pred, initial=0), np.max(valid, initial=0))) + 1
    cm = confusion_matrix(pred, gt, num_classes, ignore_index)
    iou, dice = iou_dice(cm)
    present = ~np.isnan(iou)
    tp = np.diag(cm)
    names = classes or [str(k) for k in range(num_classes)]
    return {
        "per_class": {n: {"iou": float(i), "dice": float(d)} for n, i, d in zip(names, iou, dice)},
        "mean_iou": float(np.nanmean(iou)) if present.any() else float("nan"),
        "mean_dice": float(np.nanmean(dice)) if present.any() else float("nan"),
        "accuracy": float(tp.sum() / max(cm.sum(), 1)),
    }


def instance_iou(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU between every true and predicted instance (0 = background in both).

    Returns (iou (n_gt, n_pred), gt ids, pred ids)."""
    pred, gt = np.asarray(pred).ravel(), np.asarray(gt).ravel()
    gt_ids, gi = np.unique(gt, return_inverse=True)
    pr_ids, pi = np.unique(pred, return_inverse=True)
    overlap = np.zeros((len(gt_ids), len(pr_ids)), np.int64)
    np.add.at(overlap, (gi, pi), 1)
    g_fg, p_fg = gt_ids != 0, pr_ids != 0
    overlap = overlap[g_fg][:, p_fg]
    area_g, area_p = np.bincount(gi, minlength=len(gt_ids))[g_fg], np.bincount(pi, minlength=len(pr_ids))[p_fg]
    union = area_g[:, None] + area_p[None, :] - overlap
    return overlap / np.maximum(union, 1), gt_ids[g_fg], pr_ids[p_fg]


def match_counts(iou: np.ndarray, threshold: float) -> tuple[int, int, int]:
    """(TP, FP, FN) of an optimal one-to-one matching with IoU >= threshold.

    For threshold >= 0.5 matches are unique anyway; the Hungarian step handles lower ones."""
    n_gt, n_pred = iou.shape
    if n_gt == 0 or n_pred == 0:
        return 0, n_pred, n_gt
    ok = iou >= threshold
    rows, cols = linear_sum_assignment(-(ok * (1 + iou)))  # maximise matches, then IoU
    tp = int(ok[rows, cols].sum())
    return tp, n_pred - tp, n_gt - tp


def panoptic_quality(iou: np.ndarray, threshold: float = 0.5) -> tuple[float, float, float]:
    """(PQ, SQ, RQ) from the (n_gt, n_pred) IoU matrix. With IoU > 0.5 a true instance overlaps
    at most one prediction that well (and vice versa), so matching needs no assignment."""
    n_gt, n_pred = iou.shape
    matched = iou > threshold
    tp = int(matched.sum())
    if tp == 0:
        return 0.0, 0.0, 0.0
    sq = float(iou[matched].sum() / tp)
    rq = tp / (tp + 0.5 * (n_pred - tp) + 0.5 * (n_gt - tp))
    return sq * rq, sq, rq


def instance_scores(pred: np.ndarray, gt: np.ndarray, thresholds: tuple[float, ...] = AP_THRESHOLDS) -> dict:
    """AP@0.5, AP@0.75, mAP over 0.5:0.95, F1@0.5, panoptic quality (pq, sq, rq), VOI
    split/merge and adapted Rand error.

    gt 0 is background/boundary and is ignored by VOI and Rand (scikit-image's
    `ignore_labels=(0,)` on the ground truth); AP counts instances other than 0.
    """
    from skimage.metrics import adapted_rand_error, variation_of_information

    pred = np.asarray(pred).astype(np.int64)
    gt = np.asarray(gt).astype(np.int64)
    iou, _, _ = instance_iou(pred, gt)
    ap = {}
    for t in thresholds:
        tp, fp, fn = match_counts(iou, t)
        ap[float(t)] = tp / max(tp + fp + fn, 1)
    tp, fp, fn = match_counts(iou, 0.5)
    pq, sq, rq = panoptic_quality(iou)
    split, merge = variation_of_information(gt, pred, ignore_labels=(0,))
    are, precision, recall = adapted_rand_error(gt, pred, ignore_labels=(0,))
    return {
        "ap50": ap.get(0.5, float("nan")),
        "ap75": ap.get(0.75, float("nan")),
        "map": float(np.mean(list(ap.values()))),
        "f1_50": 2 * tp / max(2 * tp + fp + fn, 1),
        "pq": pq,
        "sq": sq,
        "rq": rq,
        "voi_split": float(split),
        "voi_merge": float(merge),
        "voi": float(split + merge),
        "adapted_rand_error": float(are),
        "rand_precision": float(precision),
        "rand_recall": float(recall),
        "n_gt": int(iou.shape[0]),
        "n_pred": int(iou.shape[1]),
    }
