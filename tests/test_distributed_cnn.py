"""A CNN under DDP, proved with processes (2 gloo ranks on CPU, tests/dist_utils.py): in-fit
validation with unequal shares of tiles, SparK's sparse SyncBatchNorm, and one writer per
artefact. One launch runs every check (dist_workers.cnn_checks); each test reads its part."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dist_utils import launch
from pretrain_utils import make_archive

TINY_SPARK = """\
model:
  class_path: ssl_em.pretrain.spark.SparK
  init_args: {backbone: test_resnet, decoder_width: 16, warmup_steps: 1, image_every_n_steps: 1}
data: {tile_size: 64, batch_size: 4, num_workers: 0, samples_per_epoch: 64, block_size: 128, shuffle_buffer: 16}
trainer:
  log_every_n_steps: 1
  logger: {class_path: pytorch_lightning.loggers.CSVLogger, init_args: {save_dir: .}}
checkpoint_every_n_steps: 1
"""


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    import tifffile

    from ssl_em.synthetic import make_volume

    out = tmp_path_factory.mktemp("cnn_ranks")
    # 96 x 96 slices: the validation slice is 3 x 3 tiles of 32, 5 for rank 0 and 4 for rank 1.
    em = make_volume(shape=(3, 96, 96), seed=2)
    tifffile.imwrite(out / "image.tif", em.image, photometric="minisblack")
    tifffile.imwrite(out / "labels.tif", em.semantic, photometric="minisblack")
    # 32 x 32 slices: one validation tile, none for rank 1.
    tifffile.imwrite(out / "small_image.tif", em.image[:, :32, :32], photometric="minisblack")
    tifffile.imwrite(out / "small_labels.tif", em.semantic[:, :32, :32], photometric="minisblack")
    (out / "spark_tiny.yaml").write_text(TINY_SPARK)
    archive = make_archive(out / "em.zarr")
    launch("dist_workers:cnn_checks", 2, out, timeout=600, images=str(out / "image.tif"), labels=str(out / "labels.tif"),
           small_images=str(out / "small_image.tif"), small_labels=str(out / "small_labels.tif"),
           recipe=str(out / "spark_tiny.yaml"), archive=str(archive))
    return out


def _load(path: Path):
    return torch.load(path, weights_only=False)


@pytest.mark.parametrize("name, image", [("", "image.tif"), ("_small", "small_image.tif")])
def test_cnn_validation_inside_fit_finishes_with_one_process_metrics(ranks, name, image):
    """`ssl-em finetune` of a ResNet U-Net (BatchNorm buffers, which DDP broadcasts at the
    first forward after training, validation included) on 2 ranks, validating inside fit on
    9 tiles (5 and 4 per rank: each rank logged its own val/loss) and on 1 (none for rank 1:
    Lightning stopped the run on its empty loader): it finishes, with the same training and
    validation batches on both ranks, and val/loss and val/iou equal to one process
    validating every tile with the same weights."""
    import pytorch_lightning as pl

    from ssl_em.finetune.data import LabeledSlicesDataModule
    from ssl_em.finetune.heads import default_head
    from ssl_em.finetune.module import SegmentationModule

    r0, r1 = (_load(ranks / f"fit{name}{r}.pt") for r in (0, 1))
    assert r0["train_batches"] == r1["train_batches"] == 4
    assert len(r0["validations"]) == len(r1["validations"]) >= 2  # inside fit, more than once
    for v0, v1 in zip(r0["validations"], r1["validations"]):
        assert v0["batches"] == v1["batches"] >= 1
        assert v0["metrics"] == v1["metrics"] and {"val/loss", "val/iou"} <= set(v0["metrics"])
    last = r0["validations"][-1]
    for k, v in last["net"].items():
        assert torch.equal(v, r1["validations"][-1]["net"][k]), k
    labels = image.replace("image", "labels")
    dm = LabeledSlicesDataModule(ranks / image, ranks / labels, "0,1", "2", classes=["background", "membrane", "mito"], tile_size=32, batch_size=2)
    model = SegmentationModule("test_resnet", default_head, num_classes=3, classes=dm.classes, tile_size=32, unfreeze_at_step=0)
    model.net.load_state_dict(last["net"])
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(model, datamodule=dm, verbose=False)
    one = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    assert set(one) == set(last["metrics"])
    for k, v in one.items():
        assert last["metrics"][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k


@pytest.mark.parametrize("name", ["", "_small"])
def test_finetune_export_is_written_by_rank_0_alone(ranks, name):
    r0, r1 = (_load(ranks / f"finetune_cli{name}{r}.pt") for r in (0, 1))
    assert r0["code"] == r1["code"] == 0
    assert r0["writes"], "rank 0 wrote nothing: the audit sees no writes"
    assert r1["writes"] == []
    assert (ranks / f"model{name}" / "ssl_em_finetuned.json").is_file()


def test_spark_sync_batchnorm_uses_statistics_of_every_rank(ranks):
    """Two ranks, one step each on their own tiles and masks: the sparse BatchNorm running
    statistics and the backbone's averaged gradients equal one process's step over both
    ranks' tiles and masks, and differ from one rank's tiles alone."""
    for r in (0, 1):
        rec = _load(ranks / f"spark_sync{r}.pt")
        assert rec["synced_class"] == "SyncBatchNorm"
        (ddp_stats, ddp_grads), (pooled_stats, pooled_grads), (alone_stats, _) = rec["ddp"], rec["pooled"], rec["alone"]
        assert set(ddp_stats) == set(pooled_stats) and len(ddp_stats) >= 4
        for k, v in ddp_stats.items():
            torch.testing.assert_close(v, pooled_stats[k], rtol=1e-4, atol=1e-5, msg=k)
        assert any(not torch.allclose(alone_stats[k], v, rtol=1e-3, atol=1e-4) for k, v in ddp_stats.items() if "mean" in k)
        assert set(ddp_grads) == set(pooled_grads)
        for k, v in ddp_grads.items():
            torch.testing.assert_close(v, pooled_grads[k], rtol=1e-3, atol=1e-5, msg=k)


def test_pretrain_and_export_write_on_rank_0_alone(ranks):
    """Checkpoints, config, logs and reconstruction previews of a DDP pretraining run, and
    `ssl-em export` run by both ranks: rank 1 creates, replaces or deletes nothing."""
    r0, r1 = (_load(ranks / f"pretrain_export{r}.pt") for r in (0, 1))
    assert r0["codes"] == r1["codes"] == [0, 0]
    assert any("checkpoints" in w for w in r0["writes"]) and any("export" in w for w in r0["writes"])
    assert r1["writes"] == []
    assert (ranks / "pt" / "export" / "ssl_em.json").is_file()
    assert list((ranks / "pt" / "run").rglob("reconstructions/*.png"))


def test_pretraining_stream_gives_every_rank_the_same_batches(ranks):
    """31 tiles an epoch at batch 4 over 2 ranks of 2 loader workers each, two epochs, an
    all-reduce after each (a rank with a batch more would have hung there): every rank
    counts the batches its loader's len() promised, the same on both."""
    r0, r1 = (torch.load(ranks / f"batches{r}.pt", weights_only=True) for r in (0, 1))
    assert r0 == r1 and len(r0) == 2
    for n, promised, total in r0:
        assert n == promised >= 1 and total == 2 * n
