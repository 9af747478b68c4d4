"""`ssl-em evaluate PRED GT [--task semantic|instance] [--slices 20-29] [--json OUT]`.

PRED is an `ssl-em predict` output (OUT.zarr: its labels/semantic, which stores class k as
k + 1, or labels/instances) or any volume ssl_em reads (holding class indices or ids); GT any volume of the same shape. Semantic: ground-truth values map
to classes by `--label-values` (default: the values the model was trained with, recorded
in the prediction, else the values themselves); `--ignore-value` marks unannotated pixels.
Instance: ground truth holds instance ids, 0 = background/boundary. Prints a table; `--json`
writes the numbers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ssl_em.atomic import write_atomic
from ssl_em.data.labels import IGNORE, LabelError, parse_slices, semantic_targets
from ssl_em.data.readers.open import as_volume
from ssl_em.errors import check_writable_file
from ssl_em.inference.metrics import instance_scores, semantic_scores


def open_prediction(spec: str, task: str):
    """(Volume, ssl_em attrs or {}) for a prediction store or any volume."""
    from ssl_em.data.readers.zarr_store import ZarrVolume, group_attributes

    path = Path(spec)
    attrs = group_attributes(path).get("ssl_em", {}) if path.is_dir() else {}
    if attrs.get("format") == "ssl_em.prediction":
        if not attrs.get("complete"):
            raise LabelError(f"{spec}: prediction is incomplete (re-run `ssl-em predict` to finish it)")
        name = "instances" if task == "instance" else "semantic"
        if not (path / "labels" / name / "0").is_dir():
            raise LabelError(f"{spec}: holds no labels/{name} (predicted with --instances none?)")
        return ZarrVolume(path / "labels" / name / "0"), attrs
    from ssl_em.data.archive import Archive

    if "source" in attrs or (path.is_dir() and Archive.is_archive(path)):  # ingest's image attrs name their source
        raise LabelError(f"{spec}: is raw EM from an ssl_em archive, not a prediction; give `ssl-em predict`'s OUT.zarr or a label volume")
    return as_volume(spec), {}


def as_labels(values: np.ndarray, spec: str) -> np.ndarray:
    """Predicted class indices or ids as integers; LabelError naming `spec` when they are
    floats that are not whole numbers (probabilities, NaN): such a volume was never labels."""
    if values.dtype.kind != "f":
        return values
    if not np.isfinite(values).all():
        raise LabelError(f"{spec}: holds {int(np.count_nonzero(~np.isfinite(values)))} NaN/Inf values; a prediction holds class indices or ids")
    if not np.array_equal(values, np.round(values)):
        raise LabelError(f"{spec}: holds fractional {values.dtype} values (probabilities?), not class indices or ids")
    return values.astype(np.int64)


def default_task(pred_spec: str) -> str:
    """"instance" for an `ssl-em predict` output that holds instances, else "semantic"."""
    return "instance" if (Path(pred_spec) / "labels" / "instances" / "0").is_dir() else "semantic"


def evaluate(pred_spec: str, gt_spec: str, task: str | None = None, slices: str | None = None, label_values: list[int] | None = None, ignore_value: int | None = None) -> dict:
    """task None: `default_task(pred_spec)`."""
    task = task or default_task(pred_spec)
    pred, attrs = open_prediction(pred_spec, task)
    gt = as_volume(gt_spec)
    if tuple(pred.shape) != tuple(gt.shape):
        raise LabelError(f"prediction {pred_spec} shape {tuple(pred.shape)} != ground truth {gt_spec} shape {tuple(gt.shape)}")
    zs = parse_slices(slices, gt.shape[0], "--slices") if slices else list(range(gt.shape[0]))
    p = as_labels(np.concatenate([pred.read(z) for z in zs]), pred_spec)
    g = np.concatenate([gt.read(z) for z in zs])
    if task == "semantic" and attrs:
        from ssl_em.inference.store import semantic_classes

        p = semantic_classes(p, attrs)
    if task == "instance":
        return {"task": task, "slices": zs, **instance_scores(p, g)}
    classes = attrs.get("classes")
    values = label_values or attrs.get("label_values") or sorted(int(v) for v in np.unique(g) if v != ignore_value)
    target = semantic_targets(g, values, ignore_value, f"ground truth {gt_spec}")
    k = max(len(values), len(classes or []))
    return {"task": task, "slices": zs, **semantic_scores(p, target, k, IGNORE, classes if classes and len(classes) == k else None)}


def format_table(scores: dict) -> str:
    if scores["task"] == "instance":
        keys = ("ap50", "ap75", "map", "f1_50", "pq", "sq", "rq", "voi", "voi_split", "voi_merge", "adapted_rand_error", "n_gt", "n_pred")
        return "\n".join(f"{k:20s} {scores[k]:.4f}" if isinstance(scores[k], float) else f"{k:20s} {scores[k]}" for k in keys)
    rows = [f"{'class':16s} {'IoU':>7s} {'Dice':>7s}"] + [f"{n:16s} {s['iou']:7.4f} {s['dice']:7.4f}" for n, s in scores["per_class"].items()]
    return "\n".join(rows + [f"{'mean':16s} {scores['mean_iou']:7.4f} {scores['mean_dice']:7.4f}", f"pixel accuracy {scores['accuracy']:.4f}"])


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pred", help="ssl-em predict output (OUT.zarr) or any label volume")
    parser.add_argument("gt", help="ground-truth volume (any format ssl_em reads)")
    parser.add_argument("--task", choices=["semantic", "instance"], default=None,
                        help="default: instance if PRED is an ssl-em prediction holding instances, else semantic")
    parser.add_argument("--slices", default=None, help="z-slices to score, e.g. 20-29 (default: all)")
    parser.add_argument("--label-values", default=None, help="ground-truth value of each class, comma-separated (e.g. 255,0)")
    parser.add_argument("--ignore-value", type=int, default=None, help="ground-truth value of unannotated pixels")
    parser.add_argument("--json", default=None, help="also write the scores to this JSON file")


def run(args) -> int:
    try:
        values = [int(v) for v in args.label_values.split(",")] if args.label_values else None
    except ValueError:
        raise LabelError(f"--label-values {args.label_values}: give integers, e.g. 255,0") from None
    if args.json:
        check_writable_file(args.json, "--json")  # before the work, not after it
    scores = evaluate(args.pred, args.gt, args.task, args.slices, values, args.ignore_value)  # errors: one line from `ssl-em`
    print(format_table(scores))
    if args.json:
        write_atomic(args.json, json.dumps(scores, indent=2, default=float) + "\n")
    return 0
