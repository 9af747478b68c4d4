"""Bad input, command by command: one line on stderr naming the file or flag, exit code 2,
and nothing already written changes.

Each row of CASES is a mistake a user can make. Commands run in-process through
`ssl_em.cli.main` (a subprocess would pay ~4 s of torch import per row), against one set of
tiny fixtures shared by the module: an archive, an everything-flagged archive, an exported
backbone, a fine-tuned model, a pretraining checkpoint, a finished prediction and small
TIFF volumes. Every row checks that the shared fixtures are byte-for-byte unchanged.
`API_CASES` do the same for `load_backbone`, `load_finetuned` and `open_volume`, which
raise a documented exception instead.

`python tests/test_bad_input.py` prints a census of the table against whatever ssl_em is
importable (clear / cryptic / traceback / silently wrong), used to compare versions.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_utils import make_archive  # noqa: E402

# -- shared fixtures --------------------------------------------------------------------------


class Fx:
    """Paths of the shared fixtures (built once by `build`)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.src = root / "src"
        self.tif = self.src / "em.tif"  # 4 x 64 x 64 uint8
        self.labels = self.src / "labels.tif"  # 4 x 64 x 64, values 0 / 1
        self.labels_small = self.src / "labels_small.tif"  # 4 x 32 x 32: wrong shape
        self.archive = root / "archive.zarr"
        self.flagged = root / "flagged.zarr"
        self.backbone = root / "backbone"
        self.model = root / "model"
        self.run = root / "run"
        self.pred = root / "pred.zarr"


def _tif(path: Path, array: np.ndarray) -> Path:
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, array, photometric="minisblack")
    return path


def tiny_models(backbone_dir: Path, model_dir: Path):
    """An exported tiny ViT backbone and an (untrained) fine-tuned model on it, 32 px tiles.
    Returns (backbone module, its training-checkpoint model_args)."""
    import torch

    from ssl_em.backbones import BackboneMeta, build_backbone
    from ssl_em.export import export_backbone
    from ssl_em.finetune.model_folder import FinetunedMeta, SegmentationNet, export_finetuned, head_config
    from ssl_em.features import FeatureExtractor
    from ssl_em.finetune.heads import UNETRHead

    torch.manual_seed(0)
    args = {"in_chans": 1, "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
    backbone = build_backbone("vit_tiny_patch16_224", **args)
    meta = BackboneMeta(architecture="vit_tiny_patch16_224", model_args=args, img_size=32, patch_size=8, method="test")
    export_backbone(backbone, backbone_dir, meta)
    extractor = FeatureExtractor(backbone)
    head = UNETRHead(extractor.spec, 2, width=16, min_width=8, skip_width=8, stem_width=8)
    fmeta = FinetunedMeta(task="semantic", classes=["dark", "bright"], backbone=meta.to_dict(), feature_indices=list(extractor.indices),
                          head=head_config(head), tile_size=32, label_values=[0, 1])
    export_finetuned(SegmentationNet(extractor, head), model_dir, fmeta)
    return backbone, args


def build(root: Path) -> Fx:
    """Everything the cases share; uses only APIs older than this test module."""
    import torch

    from ssl_em.synthetic import make_volume

    fx = Fx(root)
    em = make_volume(shape=(4, 64, 64), seed=0)
    _tif(fx.tif, em.image)
    _tif(fx.labels, (em.image > np.median(em.image)).astype(np.uint8))
    _tif(fx.labels_small, np.zeros((4, 32, 32), np.uint8))
    make_archive(fx.archive)
    make_archive(fx.flagged, flag_all=True)
    backbone, args = tiny_models(fx.backbone, fx.model)
    ckpt = {"state_dict": {f"backbone.{k}": v for k, v in backbone.state_dict().items()}, "global_step": 3,
            "ssl_em": {"architecture": "vit_tiny_patch16_224", "model_args": args, "method": "test"}}
    (fx.run / "checkpoints").mkdir(parents=True)
    torch.save(ckpt, fx.run / "checkpoints" / "last.ckpt")
    with _quiet():
        assert _main(["predict", str(fx.model), str(fx.tif), "--out", str(fx.pred), "--no-progress", "--accelerator", "cpu"]) == 0
    return fx


def _main(argv: list[str]) -> int:
    from ssl_em.cli import main

    return main(argv)


@contextlib.contextmanager
def _quiet():
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def snapshot(root: Path) -> dict[str, str]:
    """Content hash of every file under `root`."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


# -- the table ----------------------------------------------------------------------------------


@dataclass
class Case:
    """argv and the text the one stderr line must hold are built from the fixtures `f` and a
    fresh folder `t` for this case; `prep` writes what the case needs into `t` first."""

    id: str
    argv: Callable[[Fx, Path], list[str]]
    names: Callable[[Fx, Path], str]
    prep: Callable[[Fx, Path], None] | None = None


def _write(rel: str, data: bytes | str | Callable[[Fx, Path], bytes]):
    def prep(f: Fx, t: Path) -> None:
        p = t / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        value = data(f, t) if callable(data) else data
        p.write_bytes(value.encode() if isinstance(value, str) else value)

    return prep


def _all(*preps):
    def prep(f: Fx, t: Path) -> None:
        for p in preps:
            p(f, t)

    return prep


def _truncated_tif(f: Fx, t: Path) -> bytes:
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, np.random.default_rng(0).integers(0, 255, (32, 64, 64), dtype=np.uint8), photometric="minisblack")
    data = buf.getvalue()
    return data[: len(data) // 2]


def _tif_bytes(array: np.ndarray) -> bytes:
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, array, photometric="minisblack")
    return buf.getvalue()


def _float_tif(bad: float):
    def make(f: Fx, t: Path) -> bytes:
        import tifffile

        a = np.random.default_rng(0).random((2, 64, 64)).astype(np.float32)
        a[1, 10:20, 10:20] = bad
        buf = io.BytesIO()
        tifffile.imwrite(buf, a, photometric="minisblack")
        return buf.getvalue()

    return make


def _bool_zarr(f: Fx, t: Path) -> None:
    import zarr

    zarr.open_array(str(t / "mask.zarr"), mode="w", shape=(2, 64, 64), dtype=bool, zarr_format=2)[...] = np.broadcast_to(np.eye(64, dtype=bool), (2, 64, 64))


def _uint8_zarr(f: Fx, t: Path) -> None:
    import zarr

    zarr.open_array(str(t / "in.zarr"), mode="w", shape=(2, 64, 64), dtype="uint8", zarr_format=2)[...] = np.random.default_rng(0).integers(0, 255, (2, 64, 64), dtype=np.uint8)


def _corrupt_chunks(f: Fx, t: Path) -> None:
    """A copy of the archive whose level-0 chunks are not blosc data any more (a bad disk)."""
    _copy_tree("archive", "a.zarr")(f, t)
    for chunk in (t / "a.zarr" / "synthetic" / "0").iterdir():
        if not chunk.name.startswith("."):
            chunk.write_bytes(b"garbage" * 50)


def _huge_h5(f: Fx, t: Path) -> None:
    """A dataset declared 100000^3 (chunked, one chunk written): kilobytes on disk."""
    import h5py

    with h5py.File(t / "huge.h5", "w") as h:
        h.create_dataset("raw", shape=(100_000,) * 3, dtype=np.uint8, chunks=(1, 256, 256))[0, :256, :256] = 7


def _h5_as_png(f: Fx, t: Path) -> None:
    import h5py

    with h5py.File(t / "image.png", "w") as h:
        h["raw"] = np.zeros((4, 8, 8), np.uint8)


def _copy_tree(src_attr: str, rel: str):
    def prep(f: Fx, t: Path) -> None:
        import shutil

        shutil.copytree(getattr(f, src_attr), t / rel)

    return prep


def _edit_json(rel: str, change: Callable[[dict], None]):
    def prep(f: Fx, t: Path) -> None:
        p = t / rel
        d = json.loads(p.read_text())
        change(d)
        p.write_text(json.dumps(d))

    return prep


def _truncate(rel: str, keep: float = 0.5):
    def prep(f: Fx, t: Path) -> None:
        p = t / rel
        data = p.read_bytes()
        p.write_bytes(data[: int(len(data) * keep)])

    return prep


def _model_copy(change: Callable[[dict], None]):
    return _all(_copy_tree("model", "m"), _edit_json("m/ssl_em_finetuned.json", change))


def _backbone_copy(change: Callable[[dict], None]):
    return _all(_copy_tree("backbone", "b"), _edit_json("b/ssl_em.json", change))


def _ckpt_without_metadata(f: Fx, t: Path) -> None:
    import torch

    torch.save({"state_dict": {}, "global_step": 1}, t / "plain.ckpt")


def _nan_volume(f: Fx, t: Path) -> None:
    a = np.random.default_rng(0).random((2, 64, 64)).astype(np.float32)
    a[1, 5, 5] = np.nan
    _tif(t / "nan.tif", a)


P = ["--no-progress", "--accelerator", "cpu"]
TINY = str(Path(__file__).resolve().parents[1] / "recipes" / "pretrain" / "tiny_cpu.yaml")
PRE = ["--config", TINY, "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", "--trainer.logger", "false"]
FT_RECIPE = str(Path(__file__).resolve().parents[1] / "recipes" / "finetune" / "tiny_cpu.yaml")


def _ft(f: Fx, t: Path, *extra: str, backbone: str | None = None) -> list[str]:
    return ["finetune", "--config", FT_RECIPE, "--backbone", backbone or str(f.backbone), "--images", str(f.tif), "--labels", str(f.labels),
            "--train-slices", "0", "--val-slices", "3", "--tile-size", "32", "--max-steps", "1", *extra]


def _bench(f: Fx, t: Path, *extra: str, backbones: list[str] | None = None, pool: str = "0-1", budgets: str = "1") -> list[str]:
    return ["benchmark", "label-efficiency", "--backbones", *(backbones or [str(f.backbone)]), "--images", str(f.tif), "--labels", str(f.labels),
            "--pool", pool, "--val-slices", "3", "--budgets", budgets, "--seeds", "0", "--max-steps", "1", "--tile-size", "32", "--out", str(t / "bench"), *extra]


CASES = [
    # ingest
    Case("ingest-missing-source", lambda f, t: ["ingest", str(t / "nope.tif"), "--out", str(t / "a.zarr"), "--quiet"], lambda f, t: str(t / "nope.tif")),
    Case("ingest-bool-volume", lambda f, t: ["ingest", str(t / "mask.zarr"), "--out", str(t / "a.zarr"), "--quiet"], lambda f, t: "mask.zarr", _bool_zarr),
    Case("ingest-tile-size-0", lambda f, t: ["ingest", str(f.tif), "--out", str(t / "a.zarr"), "--tile-size", "0", "--quiet"], lambda f, t: "--tile-size"),
    Case("ingest-tile-size-negative", lambda f, t: ["ingest", str(f.tif), "--out", str(t / "a.zarr"), "--tile-size", "-64", "--quiet"], lambda f, t: "--tile-size"),
    Case("ingest-chunks-0", lambda f, t: ["ingest", str(f.tif), "--out", str(t / "a.zarr"), "--chunks", "0,256,256", "--quiet"], lambda f, t: "--chunks"),
    Case("ingest-chunks-two", lambda f, t: ["ingest", str(f.tif), "--out", str(t / "a.zarr"), "--chunks", "1,256", "--quiet"], lambda f, t: "--chunks"),
    Case("ingest-chunks-text", lambda f, t: ["ingest", str(f.tif), "--out", str(t / "a.zarr"), "--chunks", "a,b,c", "--quiet"], lambda f, t: "--chunks"),
    Case("ingest-out-not-archive", lambda f, t: ["ingest", str(f.tif), "--out", str(t / "mine"), "--quiet"], lambda f, t: str(t / "mine"), _write("mine/notes.txt", "mine")),
    Case("ingest-out-is-file", lambda f, t: ["ingest", str(f.tif), "--out", str(t / "a.zarr"), "--quiet"], lambda f, t: str(t / "a.zarr"), _write("a.zarr", "x")),
    Case("ingest-out-under-file", lambda f, t: ["ingest", str(f.tif), "--out", str(t / "f" / "a.zarr"), "--quiet"], lambda f, t: str(t / "f"), _write("f", "x")),
    Case("ingest-truncated-tiff", lambda f, t: ["ingest", str(t / "cut.tif"), "--out", str(t / "a.zarr"), "--quiet"], lambda f, t: "cut.tif", _write("cut.tif", _truncated_tif)),
    Case("ingest-nan-volume", lambda f, t: ["ingest", str(t / "nan.tif"), "--out", str(t / "a.zarr"), "--quiet"], lambda f, t: "nan.tif", _write("nan.tif", _float_tif(np.nan))),
    Case("ingest-inf-volume", lambda f, t: ["ingest", str(t / "inf.tif"), "--out", str(t / "a.zarr"), "--quiet"], lambda f, t: "inf.tif", _write("inf.tif", _float_tif(np.inf))),
    Case("ingest-h5-named-png", lambda f, t: ["ingest", str(t / "image.png"), "--out", str(t / "a.zarr"), "--quiet"], lambda f, t: "image.png", _h5_as_png),
    Case("ingest-unknown-suffix", lambda f, t: ["ingest", str(t / "notes.txt"), "--out", str(t / "a.zarr"), "--quiet"], lambda f, t: "notes.txt", _write("notes.txt", "hello")),
    Case("ingest-garbage-tiff", lambda f, t: ["ingest", str(t / "g.tif"), "--out", str(t / "a.zarr"), "--quiet"], lambda f, t: "g.tif", _write("g.tif", bytes(range(256)) * 8)),
    Case("ingest-empty-folder", lambda f, t: ["ingest", str(t / "empty"), "--out", str(t / "a.zarr"), "--quiet"], lambda f, t: "empty", _write("empty/.keep", "")),
    Case("ingest-h5-declared-huge", lambda f, t: ["ingest", str(t / "huge.h5"), "--out", str(t / "a.zarr"), "--quiet"], lambda f, t: "huge.h5", _huge_h5),
    Case("ingest-voxel-size-text", lambda f, t: ["ingest", str(f.tif), "--out", str(t / "a.zarr"), "--voxel-size", "abc", "--quiet"], lambda f, t: "voxel-size"),
    Case("ingest-voxel-size-negative", lambda f, t: ["ingest", str(f.tif), "--out", str(t / "a.zarr"), "--voxel-size=-4", "--quiet"], lambda f, t: "voxel-size"),
    # inspect
    Case("inspect-missing", lambda f, t: ["inspect", str(t / "nope.zarr")], lambda f, t: "nope.zarr"),
    Case("inspect-not-archive", lambda f, t: ["inspect", str(f.src)], lambda f, t: str(f.src)),
    Case("inspect-corrupt-root-zattrs", lambda f, t: ["inspect", str(t / "a.zarr")], lambda f, t: ".zattrs", _all(_copy_tree("archive", "a.zarr"), _write("a.zarr/.zattrs", "{not json"))),
    Case("inspect-corrupt-image-zattrs", lambda f, t: ["inspect", str(t / "a.zarr")], lambda f, t: "synthetic/.zattrs", _all(_copy_tree("archive", "a.zarr"), _write("a.zarr/synthetic/.zattrs", "{"))),
    Case("inspect-n-0", lambda f, t: ["inspect", str(f.archive), "--sheet", str(t / "s.png"), "--n", "0"], lambda f, t: "--n"),
    Case("inspect-columns-0", lambda f, t: ["inspect", str(f.archive), "--sheet", str(t / "s.png"), "--columns", "0"], lambda f, t: "--columns"),
    Case("inspect-sheet-missing-folder", lambda f, t: ["inspect", str(f.archive), "--sheet", str(t / "no" / "s.png")], lambda f, t: str(t / "no")),
    # sample
    Case("sample-everything-flagged", lambda f, t: ["sample", str(f.flagged), "--out", str(t / "s.png"), "--n", "4", "--tile-size", "32"], lambda f, t: "flagged.zarr"),
    Case("sample-n-0", lambda f, t: ["sample", str(f.archive), "--out", str(t / "s.png"), "--n", "0"], lambda f, t: "--n"),
    Case("sample-tile-size-0", lambda f, t: ["sample", str(f.archive), "--out", str(t / "s.png"), "--tile-size", "0"], lambda f, t: "--tile-size"),
    Case("sample-tile-size-negative", lambda f, t: ["sample", str(f.archive), "--out", str(t / "s.png"), "--tile-size", "-64"], lambda f, t: "--tile-size"),
    Case("sample-tile-larger-than-images", lambda f, t: ["sample", str(f.archive), "--out", str(t / "s.png"), "--n", "4", "--tile-size", "4096"], lambda f, t: "archive.zarr"),
    Case("sample-missing-data", lambda f, t: ["sample", str(t / "nope.zarr"), "--out", str(t / "s.png")], lambda f, t: "nope.zarr"),
    Case("sample-out-missing-folder", lambda f, t: ["sample", str(f.archive), "--out", str(t / "no" / "s.png"), "--n", "4", "--tile-size", "32"], lambda f, t: str(t / "no")),
    # pretrain
    Case("pretrain-truncated-last-ckpt", lambda f, t: ["pretrain", *PRE, "--data", str(f.archive), "--run_dir", str(t / "r"), "--resume"], lambda f, t: "last.ckpt",
         _all(_copy_tree("run", "r"), _truncate("r/checkpoints/last.ckpt"))),
    Case("pretrain-batch-size-0", lambda f, t: ["pretrain", *PRE, "--data", str(f.archive), "--run_dir", str(t / "r"), "--data.batch_size", "0"], lambda f, t: "batch_size"),
    Case("pretrain-tile-size-negative", lambda f, t: ["pretrain", *PRE, "--data", str(f.archive), "--run_dir", str(t / "r"), "--data.tile_size", "-64"], lambda f, t: "tile_size"),
    Case("pretrain-checkpoint-every-0", lambda f, t: ["pretrain", *PRE, "--data", str(f.archive), "--run_dir", str(t / "r"), "--checkpoint_every_n_steps", "0"], lambda f, t: "--checkpoint_every_n_steps"),
    Case("pretrain-missing-data", lambda f, t: ["pretrain", *PRE, "--data", str(t / "nope.zarr"), "--run_dir", str(t / "r")], lambda f, t: "nope.zarr"),
    Case("pretrain-everything-flagged", lambda f, t: ["pretrain", *PRE, "--data", str(f.flagged), "--run_dir", str(t / "r")], lambda f, t: "flagged.zarr"),
    Case("pretrain-corrupt-chunk", lambda f, t: ["pretrain", *PRE, "--data", str(t / "a.zarr"), "--run_dir", str(t / "r"), "--trainer.max_steps", "2"],
         lambda f, t: "synthetic/0", _corrupt_chunks),
    Case("inspect-sheet-corrupt-chunk", lambda f, t: ["inspect", str(t / "a.zarr"), "--sheet", str(t / "s.png")], lambda f, t: "synthetic/0", _corrupt_chunks),
    Case("pretrain-nan-volume", lambda f, t: ["pretrain", *PRE, "--data", str(t / "nan.tif"), "--run_dir", str(t / "r")], lambda f, t: "nan.tif", _nan_volume),
    Case("pretrain-constant-volume", lambda f, t: ["pretrain", *PRE, "--data", str(t / "c.tif"), "--run_dir", str(t / "r")], lambda f, t: "c.tif",
         lambda f, t: _tif(t / "c.tif", np.full((2, 64, 64), 7, np.uint8)) and None),
    # a loss gone NaN (here: std 0 divides every tile by zero) stops the run at once
    Case("pretrain-nonfinite-loss", lambda f, t: ["pretrain", *PRE, "--data", str(f.archive), "--run_dir", str(t / "r"), "--trainer.max_steps", "3",
                                                  "--data.normalization.mean", "0.5", "--data.normalization.std", "0"], lambda f, t: "train/loss is nan"),
    Case("pretrain-max-steps-negative", lambda f, t: ["pretrain", *PRE, "--data", str(f.archive), "--run_dir", str(t / "r"), "--max-steps", "-5"], lambda f, t: "--max-steps"),
    Case("pretrain-devices-0", lambda f, t: ["pretrain", *PRE, "--data", str(f.archive), "--run_dir", str(t / "r"), "--devices", "0"], lambda f, t: "--devices"),
    Case("pretrain-accelerator-unknown", lambda f, t: ["pretrain", *PRE, "--data", str(f.archive), "--run_dir", str(t / "r"), "--trainer.accelerator", "tpu9"], lambda f, t: "tpu9"),
    Case("pretrain-sync-batchnorm-on-cpu", lambda f, t: ["pretrain", *PRE, "--data", str(f.archive), "--run_dir", str(t / "r"), "--trainer.accelerator", "cpu",
                                                         "--trainer.sync_batchnorm", "true"], lambda f, t: "--trainer.sync_batchnorm"),
    Case("pretrain-recipe-empty", lambda f, t: ["pretrain", *PRE, "--config", str(t / "empty.yaml"), "--data", str(f.archive), "--run_dir", str(t / "r")], lambda f, t: "empty.yaml",
         _write("empty.yaml", "")),
    Case("pretrain-unknown-model-argument", lambda f, t: ["pretrain", *PRE, "--data", str(f.archive), "--run_dir", str(t / "r"), "--model.init_args.nope", "3"], lambda f, t: "nope"),
    # export
    Case("export-no-checkpoint", lambda f, t: ["export", str(t / "empty_run"), "--out", str(t / "bb")], lambda f, t: "empty_run", _write("empty_run/config.yaml", "x: 1")),
    Case("export-missing-run", lambda f, t: ["export", str(t / "nope"), "--out", str(t / "bb")], lambda f, t: str(t / "nope")),
    Case("export-truncated-checkpoint", lambda f, t: ["export", str(t / "r"), "--out", str(t / "bb")], lambda f, t: "last.ckpt", _all(_copy_tree("run", "r"), _truncate("r/checkpoints/last.ckpt"))),
    Case("export-garbage-checkpoint", lambda f, t: ["export", str(t / "x.ckpt"), "--out", str(t / "bb")], lambda f, t: "x.ckpt", _write("x.ckpt", b"\x00garbage" * 100)),
    Case("export-no-ssl-em-metadata", lambda f, t: ["export", str(t / "plain.ckpt"), "--out", str(t / "bb")], lambda f, t: "plain.ckpt", _ckpt_without_metadata),
    Case("export-out-is-file", lambda f, t: ["export", str(f.run), "--out", str(t / "bb")], lambda f, t: str(t / "bb"), _write("bb", "x")),
    Case("export-out-foreign-folder", lambda f, t: ["export", str(f.run), "--out", str(t / "mine")], lambda f, t: str(t / "mine"), _write("mine/thesis.tex", "x")),
    # finetune
    Case("finetune-truncated-backbone-weights", lambda f, t: _ft(f, t, backbone=str(t / "b")), lambda f, t: "model.safetensors", _all(_copy_tree("backbone", "b"), _truncate("b/model.safetensors"))),
    Case("finetune-corrupt-backbone-json", lambda f, t: _ft(f, t, backbone=str(t / "b")), lambda f, t: "ssl_em.json", _all(_copy_tree("backbone", "b"), _write("b/ssl_em.json", "{"))),
    Case("finetune-backbone-checkpoint-path", lambda f, t: _ft(f, t, backbone=str(t / "b")), lambda f, t: "checkpoint_path",
         _backbone_copy(lambda d: d["model_args"].update(checkpoint_path="/etc/passwd"))),
    # a backbone's recorded recipe is data: known keys of checked types, never a class to import
    Case("finetune-backbone-recipe-names-a-head", lambda f, t: _ft(f, t, backbone=str(t / "b")), lambda f, t: "finetune settings ['head']",
         _backbone_copy(lambda d: d.update(finetune={"head": {"class_path": "this.s"}}))),
    Case("finetune-backbone-recipe-wrong-type", lambda f, t: _ft(f, t, backbone=str(t / "b")), lambda f, t: "finetune.unfreeze_at_step",
         _backbone_copy(lambda d: d.update(finetune={"unfreeze_at_step": "soon"}))),
    Case("finetune-backbone-recipe-not-an-object", lambda f, t: _ft(f, t, backbone=str(t / "b")), lambda f, t: "finetune",
         _backbone_copy(lambda d: d.update(finetune=[1, 2]))),
    Case("finetune-backbone-nan-normalization", lambda f, t: _ft(f, t, backbone=str(t / "b")), lambda f, t: "normalization",
         _backbone_copy(lambda d: d["normalization"].update(mean=float("nan")))),
    Case("finetune-backbone-img-size-text", lambda f, t: _ft(f, t, backbone=str(t / "b")), lambda f, t: "img_size", _backbone_copy(lambda d: d.update(img_size="abc"))),
    Case("finetune-out-is-file", lambda f, t: _ft(f, t, "--out", str(t / "o")), lambda f, t: str(t / "o"), _write("o", "x")),
    Case("finetune-train-slices-text", lambda f, t: _ft(f, t, "--train-slices=x-3"), lambda f, t: "--train-slices"),
    Case("finetune-train-slices-outside", lambda f, t: _ft(f, t, "--train-slices", "7"), lambda f, t: "--train-slices"),
    Case("finetune-val-slices-backwards", lambda f, t: _ft(f, t, "--val-slices", "3-2"), lambda f, t: "--val-slices"),
    Case("finetune-constant-images", lambda f, t: _ft(f, t, "--images", str(t / "c.tif")), lambda f, t: "c.tif", _write("c.tif", lambda f, t: _tif_bytes(np.full((4, 64, 64), 9, np.uint8)))),
    Case("finetune-max-steps-negative", lambda f, t: _ft(f, t, "--max-steps", "-3"), lambda f, t: "--max-steps"),
    Case("finetune-devices-0", lambda f, t: _ft(f, t, "--trainer.devices", "0"), lambda f, t: "--trainer.devices"),
    Case("finetune-accelerator-unknown", lambda f, t: _ft(f, t, "--trainer.accelerator", "tpu9"), lambda f, t: "tpu9"),
    Case("finetune-sync-batchnorm-on-cpu", lambda f, t: _ft(f, t, "--trainer.accelerator", "cpu", "--trainer.sync_batchnorm", "true"), lambda f, t: "--trainer.sync_batchnorm"),
    # bioimage.io needs a licence: asked for before training
    Case("finetune-bioimageio-no-license", lambda f, t: _ft(f, t, "--out", str(t / "m"), "--bioimageio", str(t / "b")), lambda f, t: "--license"),
    Case("finetune-lr-negative", lambda f, t: _ft(f, t, "--lr=-0.1"), lambda f, t: "--lr"),
    Case("finetune-nan-labels", lambda f, t: _ft(f, t, "--labels", str(t / "l.tif")), lambda f, t: "l.tif",
         _write("l.tif", lambda f, t: _tif_bytes(np.where(np.arange(64) % 2, np.nan, 1.0).astype(np.float32) * np.ones((4, 64, 64), np.float32)))),
    Case("finetune-recipe-yaml-syntax", lambda f, t: _ft(f, t, "--config", str(t / "bad.yaml")), lambda f, t: "bad.yaml", _write("bad.yaml", "model:\n  lr: [1\n")),
    Case("finetune-recipe-is-a-list", lambda f, t: _ft(f, t, "--config", str(t / "list.yaml")), lambda f, t: "list.yaml", _write("list.yaml", "- 1\n- 2\n")),
    Case("finetune-lr-text", lambda f, t: _ft(f, t, "--lr", "abc"), lambda f, t: "--model.lr"),
    Case("finetune-strategy-fsdp", lambda f, t: _ft(f, t, "--trainer.strategy", "fsdp"), lambda f, t: "--trainer.strategy"),
    Case("finetune-missing-images", lambda f, t: _ft(f, t, "--images", str(t / "nope.tif")), lambda f, t: "nope.tif"),
    Case("finetune-labels-other-shape", lambda f, t: _ft(f, t, "--labels", str(f.labels_small)), lambda f, t: "labels_small.tif"),
    Case("finetune-missing-backbone", lambda f, t: _ft(f, t, backbone=str(t / "nope")), lambda f, t: "nope"),
    # predict
    Case("predict-missing-model", lambda f, t: ["predict", str(t / "nope"), str(f.tif), "--out", str(t / "o.zarr"), *P], lambda f, t: "nope"),
    Case("predict-foreign-head-class", lambda f, t: ["predict", str(t / "m"), str(f.tif), "--out", str(t / "o.zarr"), *P], lambda f, t: "class_path",
         _model_copy(lambda d: d["head"].update(class_path="os.system"))),
    Case("predict-checkpoint-path-in-model-args", lambda f, t: ["predict", str(t / "m"), str(f.tif), "--out", str(t / "o.zarr"), *P], lambda f, t: "checkpoint_path",
         _model_copy(lambda d: d["backbone"]["model_args"].update(checkpoint_path="/etc/passwd"))),
    Case("predict-pretrained-cfg-overlay", lambda f, t: ["predict", str(t / "m"), str(f.tif), "--out", str(t / "o.zarr"), *P], lambda f, t: "pretrained_cfg_overlay",
         _model_copy(lambda d: d["backbone"]["model_args"].update(pretrained_cfg_overlay={"file": "/tmp/x"}))),
    Case("predict-hub-architecture", lambda f, t: ["predict", str(t / "m"), str(f.tif), "--out", str(t / "o.zarr"), *P], lambda f, t: "hf-hub",
         _model_copy(lambda d: d["backbone"].update(architecture="hf-hub:someone/model"))),
    Case("predict-truncated-weights", lambda f, t: ["predict", str(t / "m"), str(f.tif), "--out", str(t / "o.zarr"), *P], lambda f, t: "model.safetensors",
         _all(_copy_tree("model", "m"), _truncate("m/model.safetensors"))),
    Case("predict-corrupt-json", lambda f, t: ["predict", str(t / "m"), str(f.tif), "--out", str(t / "o.zarr"), *P], lambda f, t: "ssl_em_finetuned.json",
         _all(_copy_tree("model", "m"), _write("m/ssl_em_finetuned.json", "{"))),
    Case("predict-missing-input", lambda f, t: ["predict", str(f.model), str(t / "nope.tif"), "--out", str(t / "o.zarr"), *P], lambda f, t: "nope.tif"),
    Case("predict-nan-input", lambda f, t: ["predict", str(f.model), str(t / "nan.tif"), "--out", str(t / "o.zarr"), *P], lambda f, t: "nan.tif", _nan_volume),
    Case("predict-out-is-file", lambda f, t: ["predict", str(f.model), str(f.tif), "--out", str(t / "o.zarr"), *P], lambda f, t: "o.zarr", _write("o.zarr", "x")),
    Case("predict-out-under-file", lambda f, t: ["predict", str(f.model), str(f.tif), "--out", str(t / "f" / "o.zarr"), *P], lambda f, t: str(t / "f"), _write("f", "x")),
    Case("predict-constant-input", lambda f, t: ["predict", str(f.model), str(t / "c.tif"), "--out", str(t / "o.zarr"), *P], lambda f, t: "c.tif",
         _write("c.tif", lambda f, t: _tif_bytes(np.zeros((2, 64, 64), np.uint8)))),
    Case("predict-incomplete-archive-image", lambda f, t: ["predict", str(f.model), str(t / "a.zarr" / "synthetic"), "--out", str(t / "o.zarr"), *P], lambda f, t: "synthetic",
         _all(_copy_tree("archive", "a.zarr"), _edit_json("a.zarr/synthetic/.zattrs", lambda d: d["ssl_em"].update(complete=False)))),
    Case("predict-archive-root-with-incomplete-image", lambda f, t: ["predict", str(f.model), str(t / "a.zarr"), "--out", str(t / "o.zarr"), *P], lambda f, t: "synthetic",
         _all(_copy_tree("archive", "a.zarr"), _edit_json("a.zarr/synthetic/.zattrs", lambda d: d["ssl_em"].update(complete=False)),
              _edit_json("a.zarr/OME/.zattrs", lambda d: d.update(series=[])))),
    Case("predict-corrupt-chunk", lambda f, t: ["predict", str(f.model), str(t / "a.zarr" / "synthetic"), "--out", str(t / "o.zarr"), *P], lambda f, t: "synthetic/0", _corrupt_chunks),
    Case("predict-slab-0", lambda f, t: ["predict", str(f.model), str(f.tif), "--out", str(t / "o.zarr"), "--slab", "0", *P], lambda f, t: "--slab"),
    Case("predict-batch-size-0", lambda f, t: ["predict", str(f.model), str(f.tif), "--out", str(t / "o.zarr"), "--batch-size", "0", *P], lambda f, t: "--batch-size"),
    Case("predict-overlap-negative", lambda f, t: ["predict", str(f.model), str(f.tif), "--out", str(t / "o.zarr"), "--overlap=-4", *P], lambda f, t: "--overlap"),
    Case("predict-overlap-equals-window", lambda f, t: ["predict", str(f.model), str(f.tif), "--out", str(t / "o.zarr"), "--overlap", "32", *P], lambda f, t: "--overlap"),
    Case("predict-window-0", lambda f, t: ["predict", str(f.model), str(f.tif), "--out", str(t / "o.zarr"), "--window", "0", *P], lambda f, t: "--window"),
    Case("predict-other-settings-same-out", lambda f, t: ["predict", str(f.model), str(f.tif), "--out", str(f.pred), "--overlap", "4", *P], lambda f, t: "pred.zarr"),
    # --overwrite replaces an earlier prediction only, never what --out happens to name
    Case("predict-overwrite-the-input", lambda f, t: ["predict", str(f.model), str(t / "in.zarr"), "--out", str(t / "in.zarr"), "--overwrite", *P], lambda f, t: "in.zarr", _uint8_zarr),
    Case("predict-overwrite-the-model", lambda f, t: ["predict", str(t / "m"), str(f.tif), "--out", str(t / "m"), "--overwrite", *P], lambda f, t: str(t / "m"), _copy_tree("model", "m")),
    Case("predict-overwrite-an-archive", lambda f, t: ["predict", str(f.model), str(f.tif), "--out", str(t / "a.zarr"), "--overwrite", *P], lambda f, t: "a.zarr", _copy_tree("archive", "a.zarr")),
    Case("predict-overwrite-own-files", lambda f, t: ["predict", str(f.model), str(f.tif), "--out", str(t / "mine"), "--overwrite", *P], lambda f, t: "mine", _write("mine/thesis.tex", "x")),
    Case("predict-nan-normalization-model", lambda f, t: ["predict", str(t / "m"), str(f.tif), "--out", str(t / "o.zarr"), *P], lambda f, t: "normalization",
         _model_copy(lambda d: d["normalization"].update(std=float("nan")))),
    Case("predict-task-panoptic", lambda f, t: ["predict", str(t / "m"), str(f.tif), "--out", str(t / "o.zarr"), *P], lambda f, t: "task", _model_copy(lambda d: d.update(task="panoptic"))),
    Case("predict-model-tile-size-text", lambda f, t: ["predict", str(t / "m"), str(f.tif), "--out", str(t / "o.zarr"), *P], lambda f, t: "tile_size", _model_copy(lambda d: d.update(tile_size="big"))),
    Case("predict-model-tile-size-0", lambda f, t: ["predict", str(t / "m"), str(f.tif), "--out", str(t / "o.zarr"), *P], lambda f, t: "tile_size", _model_copy(lambda d: d.update(tile_size=0))),
    Case("predict-not-a-model-folder", lambda f, t: ["predict", str(f.backbone), str(f.tif), "--out", str(t / "o.zarr"), *P], lambda f, t: "backbone"),
    # evaluate
    Case("evaluate-json-missing-folder", lambda f, t: ["evaluate", str(f.pred), str(f.labels), "--json", str(t / "no" / "s.json")], lambda f, t: str(t / "no")),
    Case("evaluate-missing-pred", lambda f, t: ["evaluate", str(t / "nope.zarr"), str(f.labels)], lambda f, t: "nope.zarr"),
    Case("evaluate-missing-gt", lambda f, t: ["evaluate", str(f.pred), str(t / "nope.tif")], lambda f, t: "nope.tif"),
    Case("evaluate-shape-mismatch", lambda f, t: ["evaluate", str(f.pred), str(f.labels_small)], lambda f, t: "labels_small.tif"),
    Case("evaluate-slices-outside", lambda f, t: ["evaluate", str(f.pred), str(f.labels), "--slices", "9"], lambda f, t: "--slices"),
    Case("evaluate-slices-text", lambda f, t: ["evaluate", str(f.pred), str(f.labels), "--slices", "a-b"], lambda f, t: "--slices"),
    Case("evaluate-label-values-text", lambda f, t: ["evaluate", str(f.pred), str(f.labels), "--label-values", "a,b"], lambda f, t: "--label-values"),
    Case("evaluate-float-nan-prediction", lambda f, t: ["evaluate", str(t / "p.tif"), str(f.labels)], lambda f, t: "p.tif",
         _write("p.tif", lambda f, t: _tif_bytes(np.where(np.arange(64) % 2, np.nan, 1.0).astype(np.float32) * np.ones((4, 64, 64), np.float32)))),
    Case("evaluate-probabilities", lambda f, t: ["evaluate", str(t / "p.tif"), str(f.labels)], lambda f, t: "p.tif",
         _write("p.tif", lambda f, t: _tif_bytes(np.full((4, 64, 64), 0.7, np.float32)))),
    Case("evaluate-raw-archive-image", lambda f, t: ["evaluate", str(f.archive / "synthetic"), str(t / "gt.tif")], lambda f, t: "synthetic",
         _write("gt.tif", lambda f, t: _tif_bytes(np.zeros((4, 128, 128), np.uint8)))),
    # export-model
    Case("export-model-nan-sample", lambda f, t: ["export-model", str(f.model), "--sample", str(t / "nan.tif"), "--out", str(t / "bmz")], lambda f, t: "nan.tif",
         _write("nan.tif", lambda f, t: _tif_bytes(np.full((2, 64, 64), np.nan, np.float32)))),
    Case("export-model-constant-sample", lambda f, t: ["export-model", str(f.model), "--sample", str(t / "c.tif"), "--out", str(t / "bmz")], lambda f, t: "c.tif",
         _write("c.tif", lambda f, t: _tif_bytes(np.full((2, 64, 64), 3, np.uint8)))),
    Case("export-model-unknown-license", lambda f, t: ["export-model", str(f.model), "--sample", str(f.tif), "--out", str(t / "bmz"), "--license", "NOT-A-LICENSE"], lambda f, t: "--license"),
    Case("export-model-no-license", lambda f, t: ["export-model", str(f.model), "--sample", str(f.tif), "--out", str(t / "bmz")], lambda f, t: "--license"),
    Case("demo-pretrain-steps-negative", lambda f, t: ["demo", "--out", str(t / "demo"), "--pretrain-steps", "-1"], lambda f, t: "--pretrain-steps"),
    # synth
    Case("synth-shape-zero", lambda f, t: ["synth", "--out", str(t / "s"), "--shape", "0,0,0"], lambda f, t: "--shape"),
    Case("synth-shape-text", lambda f, t: ["synth", "--out", str(t / "s"), "--shape", "a,b"], lambda f, t: "--shape"),
    Case("synth-shape-huge", lambda f, t: ["synth", "--out", str(t / "s"), "--shape", "100000,100000,100000"], lambda f, t: "--shape"),
    # benchmark
    Case("benchmark-missing-backbone", lambda f, t: _bench(f, t, backbones=[str(t / "nope")]), lambda f, t: "nope"),
    Case("benchmark-budget-larger-than-pool", lambda f, t: _bench(f, t, budgets="8"), lambda f, t: "--budgets"),
    Case("benchmark-pool-text", lambda f, t: _bench(f, t, pool="x-3"), lambda f, t: "--pool"),
    Case("benchmark-seeds-text", lambda f, t: _bench(f, t, "--seeds", "a"), lambda f, t: "--seeds"),
    Case("benchmark-budgets-text", lambda f, t: _bench(f, t, budgets="two"), lambda f, t: "--budgets"),
    Case("benchmark-backbone-recipe-names-a-head", lambda f, t: _bench(f, t, backbones=[str(t / "b")]), lambda f, t: "finetune settings ['head']",
         _backbone_copy(lambda d: d.update(finetune={"head": "x"}))),
    Case("benchmark-report-garbage-csv", lambda f, t: ["benchmark", "report", "--out", str(t / "b")], lambda f, t: "results.csv", _write("b/results.csv", "a,b\n1,2\n\x00,zz\n")),
    Case("benchmark-report-score-text", lambda f, t: ["benchmark", "report", "--out", str(t / "b")], lambda f, t: "line 2",
         _write("b/results.csv", "arm,backbone,random_init,budget,seed,score\nx,y,False,1,0,high\n")),
    Case("benchmark-foreign-backbone", lambda f, t: _bench(f, t, backbones=[str(t / "b")]), lambda f, t: "checkpoint_path",
         _backbone_copy(lambda d: d["model_args"].update(checkpoint_path="/etc/passwd"))),
]


def _load_backbone(path):
    from ssl_em.backbones import load_backbone

    return load_backbone(path)


def _load_finetuned(path):
    from ssl_em.finetune.model_folder import load_finetuned

    return load_finetuned(path)


def _open_volume(path):
    from ssl_em.data.readers.open import open_volume

    return open_volume(path)


#: (id, call(f, t), what it must name, prep): each raises the documented exception
#: (BackboneError for models, VolumeError for volumes) naming the file or key.
API_CASES = [
    ("load_backbone-missing", lambda f, t: _load_backbone(t / "nope"), lambda f, t: "nope", None),
    ("load_backbone-corrupt-json", lambda f, t: _load_backbone(t / "b"), lambda f, t: "ssl_em.json", _all(_copy_tree("backbone", "b"), _write("b/ssl_em.json", "[1, 2"))),
    ("load_backbone-json-list", lambda f, t: _load_backbone(t / "b"), lambda f, t: "ssl_em.json", _all(_copy_tree("backbone", "b"), _write("b/ssl_em.json", "[1, 2]"))),
    ("load_backbone-truncated-weights", lambda f, t: _load_backbone(t / "b"), lambda f, t: "model.safetensors", _all(_copy_tree("backbone", "b"), _truncate("b/model.safetensors"))),
    ("load_backbone-checkpoint-path", lambda f, t: _load_backbone(t / "b"), lambda f, t: "checkpoint_path",
     _backbone_copy(lambda d: d["model_args"].update(checkpoint_path="/tmp/evil.pth"))),
    ("load_backbone-pretrained-true", lambda f, t: _load_backbone(t / "b"), lambda f, t: "pretrained", _backbone_copy(lambda d: d["model_args"].update(pretrained=True))),
    ("load_backbone-local-dir-architecture", lambda f, t: _load_backbone(t / "b"), lambda f, t: "local-dir", _backbone_copy(lambda d: d.update(architecture="local-dir:/tmp"))),
    ("load_backbone-nan-normalization", lambda f, t: _load_backbone(t / "b"), lambda f, t: "normalization", _backbone_copy(lambda d: d["normalization"].update(mean=float("nan")))),
    ("load_backbone-zero-std", lambda f, t: _load_backbone(t / "b"), lambda f, t: "normalization", _backbone_copy(lambda d: d["normalization"].update(std=0))),
    ("load_backbone-img-size-text", lambda f, t: _load_backbone(t / "b"), lambda f, t: "img_size", _backbone_copy(lambda d: d.update(img_size="abc"))),
    ("load_backbone-patch-size-negative", lambda f, t: _load_backbone(t / "b"), lambda f, t: "patch_size", _backbone_copy(lambda d: d.update(patch_size=-1))),
    ("load_backbone-no-architecture", lambda f, t: _load_backbone(t / "b"), lambda f, t: "architecture", _backbone_copy(lambda d: d.pop("architecture"))),
    ("load_backbone-recipe-class-path", lambda f, t: _load_backbone(t / "b"), lambda f, t: "finetune", _backbone_copy(lambda d: d.update(finetune={"head": {"class_path": "os.system"}}))),
    ("load_finetuned-task-panoptic", lambda f, t: _load_finetuned(t / "m"), lambda f, t: "task", _model_copy(lambda d: d.update(task="panoptic"))),
    ("load_finetuned-nan-normalization", lambda f, t: _load_finetuned(t / "m"), lambda f, t: "normalization", _model_copy(lambda d: d["normalization"].update(mean=float("nan")))),
    ("load_finetuned-backbone-zero-std", lambda f, t: _load_finetuned(t / "m"), lambda f, t: "normalization", _model_copy(lambda d: d["backbone"]["normalization"].update(std=0.0))),
    ("load_finetuned-classes-empty", lambda f, t: _load_finetuned(t / "m"), lambda f, t: "classes", _model_copy(lambda d: d.update(classes=[]))),
    ("load_finetuned-foreign-class-path", lambda f, t: _load_finetuned(t / "m"), lambda f, t: "class_path", _model_copy(lambda d: d["head"].update(class_path="ssl_em_evil_probe.Head"))),
    ("load_finetuned-head-from-other-module", lambda f, t: _load_finetuned(t / "m"), lambda f, t: "class_path", _model_copy(lambda d: d["head"].update(class_path="torch.nn.Identity"))),
    ("load_finetuned-foreign-init-args", lambda f, t: _load_finetuned(t / "m"), lambda f, t: "init_args", _model_copy(lambda d: d["head"]["init_args"].update(evil=1))),
    ("open_volume-missing", lambda f, t: _open_volume(t / "nope.tif"), lambda f, t: "nope.tif", None),
    ("open_volume-truncated-tiff", lambda f, t: _open_volume(t / "cut.tif"), lambda f, t: "cut.tif", _write("cut.tif", _truncated_tif)),
    ("open_volume-h5-named-png", lambda f, t: _open_volume(t / "image.png"), lambda f, t: "image.png", _h5_as_png),
]


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> Fx:
    return build(tmp_path_factory.mktemp("shared"))


def invoke(argv: list[str]) -> tuple[int | BaseException, str, str]:
    """(exit code or the exception raised, stdout, stderr) of `ssl-em argv`, in-process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            result: int | BaseException = _main(argv)
        except SystemExit as e:
            result = e.code if isinstance(e.code, int) else 1
        except Exception as e:  # noqa: BLE001 - a traceback is one of the outcomes counted
            result = e
    return result, out.getvalue(), err.getvalue()


def _lines(err: str) -> list[str]:
    """stderr lines, less the start-up chatter of Lightning's Trainer (not ours to judge)."""
    chatter = ("GPU available", "TPU available", "HPU available", "Seed set to", "💡", "`Trainer", "Trainer already")
    return [line for line in err.splitlines() if line.strip() and not line.startswith(chatter)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_is_one_line_and_exit_2(case: Case, fx: Fx, tmp_path: Path):
    if case.prep:
        case.prep(fx, tmp_path)
    before, mine = snapshot(fx.root), snapshot(tmp_path)
    result, _, err = invoke(case.argv(fx, tmp_path))
    if isinstance(result, BaseException):
        raise result
    lines = _lines(err)
    command = case.argv(fx, tmp_path)[0]
    assert result == 2, f"exit {result}; stderr: {err[-2000:]}"
    assert len(lines) == 1, err
    assert lines[0].startswith(f"ssl-em {command}: error: "), lines[0]
    assert case.names(fx, tmp_path) in lines[0], lines[0]
    assert snapshot(fx.root) == before  # shared outputs untouched
    # The case's own inputs are unchanged too (a refused ingest leaves no empty group).
    assert {k: v for k, v in snapshot(tmp_path).items() if k in mine} == mine


@pytest.mark.parametrize("case", API_CASES, ids=lambda c: c[0])
def test_api_raises_documented_error(case, fx: Fx, tmp_path: Path):
    from ssl_em.data.volume import VolumeError
    from ssl_em.backbones import BackboneError

    name, call, names, prep = case
    if prep:
        prep(fx, tmp_path)
    kind = VolumeError if name.startswith("open_volume") else BackboneError
    with pytest.raises(kind) as e:
        call(fx, tmp_path)
    assert names(fx, tmp_path) in str(e.value) and len(str(e.value).splitlines()) == 1


def test_foreign_head_module_is_never_imported(fx: Fx, tmp_path: Path, monkeypatch):
    """A model folder naming a module of the sender's: refused before the import runs it."""
    from ssl_em.backbones import BackboneError

    probe = tmp_path / "mods" / "ssl_em_evil_probe.py"
    probe.parent.mkdir()
    marker = tmp_path / "imported"
    probe.write_text(f"open({str(marker)!r}, 'w').write('ran')\nimport torch\nHead = torch.nn.Identity\n")
    monkeypatch.syspath_prepend(str(probe.parent))
    _model_copy(lambda d: d["head"].update(class_path="ssl_em_evil_probe.Head"))(fx, tmp_path)
    with pytest.raises(BackboneError, match="not one of ssl_em's heads"):
        _load_finetuned(tmp_path / "m")
    assert not marker.exists() and "ssl_em_evil_probe" not in sys.modules


def test_backbone_recipe_never_imports_code(fx: Fx, tmp_path: Path, monkeypatch):
    """`finetune --backbone FOLDER` whose ssl_em.json recommends a head by class path: refused
    before jsonargparse imports the module (which would run the sender's code)."""
    probe = tmp_path / "mods" / "ssl_em_recipe_probe.py"
    probe.parent.mkdir()
    marker = tmp_path / "imported"
    probe.write_text(f"open({str(marker)!r}, 'w').write('ran')\nimport torch\nHead = torch.nn.Identity\n")
    monkeypatch.syspath_prepend(str(probe.parent))
    _backbone_copy(lambda d: d.update(finetune={"head": {"class_path": "ssl_em_recipe_probe.Head"}}))(fx, tmp_path)
    result, _, err = invoke(_ft(fx, tmp_path, backbone=str(tmp_path / "b")))
    assert result == 2 and "finetune settings ['head']" in err, err
    assert not marker.exists() and "ssl_em_recipe_probe" not in sys.modules


def test_debug_shows_the_traceback(fx: Fx, tmp_path: Path, monkeypatch):
    from ssl_em.data.volume import VolumeError

    with pytest.raises(VolumeError):
        _main(["ingest", str(fx.tif), "--out", str(tmp_path / "a.zarr"), "--voxel-size", "x", "--debug"])
    monkeypatch.setenv("SSL_EM_DEBUG", "1")
    with pytest.raises(VolumeError):
        _main(["predict", str(fx.model), str(tmp_path / "nope.tif"), "--out", str(tmp_path / "o.zarr"), *P])


# -- census (python tests/test_bad_input.py) --------------------------------------------------


def classify(case: Case, f: Fx, t: Path) -> str:
    """clear (non-zero exit, one line naming the file or flag), cryptic (non-zero exit but
    not that), traceback (an exception escaped), silent (exit 0: a wrong result)."""
    if case.prep:
        case.prep(f, t)
    result, _, err = invoke(case.argv(f, t))
    if isinstance(result, BaseException):
        return "traceback"
    if result == 0:
        return "silent"
    lines = _lines(err)
    return "clear" if len(lines) == 1 and case.names(f, t) in lines[0] else "cryptic"


if __name__ == "__main__":  # pragma: no cover - a measuring tool, not a test
    import tempfile
    from collections import Counter

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        f = build(root / "shared")
        counts, rows = Counter(), []
        for i, case in enumerate(CASES):
            t = root / f"case{i}"
            t.mkdir()
            try:
                kind = classify(case, f, t)
            except Exception as e:  # noqa: BLE001 - a prep that the old code cannot do
                kind = f"error in prep: {e}"
            counts[kind] += 1
            rows.append(f"{kind:10s} {case.id}")
        print("\n".join(rows))
        print(dict(counts), "of", len(CASES))
