"""What each rank runs in the multi-process tests (see dist_utils.launch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


def random_draws(rank: int, world: int, kw: dict) -> None:
    """For seeds 0, 0, 1: a view of a fixed batch, MAE masks, fine-tuning tiles and the global
    RNG after SeedPerRank's re-seed, each drawn afresh as a new run would."""
    from pretrain_utils import TINY_VIT
    from pytorch_lightning import seed_everything

    from ssl_em.data.augment import em_view
    from ssl_em.finetune.data import TrainTiles
    from ssl_em.pretrain.mae import MAE
    from ssl_em.seeding import seed_process

    x = torch.linspace(-2, 2, 4 * 32 * 32).view(4, 1, 32, 32)
    images = np.random.default_rng(0).random((2, 48, 48), dtype=np.float32)
    targets = np.zeros((2, 48, 48), np.int64)
    out = {}
    for run, seed in enumerate((0, 0, 1)):
        seed_everything(seed, verbose=False)
        mae = MAE("vit_tiny_patch16_224", img_size=32, backbone_kwargs=TINY_VIT, decoder_dim=16, decoder_depth=1, decoder_heads=2)
        tiles = TrainTiles(images, targets, tile=16, length=8)
        out[run] = {
            "view": em_view(32)(x),
            "mask": mae(x)["mask"],
            "tiles": torch.stack([t["image"] for t in tiles]),
            "tiles_epoch2": torch.stack([t["image"] for t in tiles]),
            "global": (seed_process(), torch.rand(3))[1],
        }
    torch.save(out, Path(kw["out"]) / f"draws{rank}.pt")


def equal_batches(rank: int, world: int, kw: dict) -> None:
    """Two epochs of the pretraining stream through a DataLoader with workers; after each, an
    all-reduce (what DDP and epoch-end metrics do): a rank with fewer batches would hang here."""
    from ssl_em.data.stream import EMDataModule

    dm = EMDataModule(kw["archive"], tile_size=32, batch_size=kw["batch"], num_workers=kw["workers"],
                      samples_per_epoch=kw["samples"], block_size=128, shuffle_buffer=16)
    dm.setup("fit")
    dm.dataset.rank, dm.dataset.world_size = rank, world
    loader = dm.train_dataloader()
    counts = []
    for _ in range(2):
        n = sum(1 for _ in loader)
        t = torch.tensor([n])
        dist.all_reduce(t)
        counts.append((n, len(loader), int(t)))
    torch.save(counts, Path(kw["out"]) / f"batches{rank}.pt")


def _ddp_trainer(**kw):
    """A Lightning DDP trainer joining the process group dist_utils started (LOCAL_RANK is
    set, so Lightning takes the processes as launched externally, as under torchrun)."""
    import pytorch_lightning as pl
    from pytorch_lightning.strategies import DDPStrategy

    return pl.Trainer(accelerator="cpu", devices=2, strategy=DDPStrategy(process_group_backend="gloo"), logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kw)


def finetune_ddp(rank: int, world: int, kw: dict) -> None:
    """Fine-tune a tiny ViT + UNETR head frozen then unfrozen (and trainable from step 0),
    then validate: backbone weights and validation IoU of both ranks, and the IoU one
    process computes over all validation tiles with the same weights."""
    import functools

    from pytorch_lightning import seed_everything

    from ssl_em.finetune.data import GridTiles, LabeledSlicesDataModule
    from ssl_em.finetune.heads import UNETRHead
    from ssl_em.finetune.module import SegmentationModule
    from ssl_em.inference.metrics import confusion_matrix, iou_dice
    from ssl_em.synthetic import make_volume

    em = make_volume(shape=(4, 64, 64), seed=1)
    head = functools.partial(UNETRHead, width=8, min_width=8, skip_width=8, stem_width=8)
    out = {}
    for unfreeze in (2, 0):
        seed_everything(0, verbose=False)
        dm = LabeledSlicesDataModule(em.image, em.semantic, train_slices="0,1", val_slices="2,3", tile_size=32, batch_size=2, tiles_per_epoch=8)
        model = SegmentationModule("test_vit", head, num_classes=dm.num_classes, tile_size=32, unfreeze_at_step=unfreeze, lr=1e-2, backbone_lr_scale=1.0, augment=True)
        before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
        _ddp_trainer(max_steps=5, limit_val_batches=0, num_sanity_val_steps=0).fit(model, datamodule=dm)
        moved = [k for k, v in model.backbone.state_dict().items() if not torch.equal(v, before[k])]
        out[unfreeze] = {"backbone": model.backbone.state_dict(), "moved": len(moved)}
    # Validation over ranks, then every tile in this one process with the same weights.
    _ddp_trainer().validate(model, datamodule=dm, verbose=False)
    grid = GridTiles(*dm._val, 32)
    model.eval()
    cm = 0
    with torch.no_grad():
        for i in range(len(grid.index)):
            b = model.on_after_batch_transfer({k: v[None] for k, v in grid[i].items()}, 0)
            cm = cm + confusion_matrix(model(b["image"]).argmax(1).numpy(), b["target"].numpy(), dm.num_classes, ignore_index=-1)
    out["val_iou"] = model.last_val_iou
    out["one_process_iou"] = [float(v) for v in iou_dice(cm)[0]]  # numpy, against torchmetrics' rank-summed matrix
    out["val_tiles"] = len(grid)
    torch.save(out, Path(kw["out"]) / f"finetune{rank}.pt")


def predict_instances(rank: int, world: int, kw: dict) -> None:
    """Two ranks share a prediction with 2D instances; rank 0's post-processing is slowed by
    kw["slow"] s and every barrier is a monitored one that fails after kw["barrier_s"] s, so a
    rank left waiting for rank 0's instances fails the run."""
    import time
    from datetime import timedelta

    from torch import nn

    import ssl_em.inference.predict as P
    from ssl_em.data.normalize import Normalization
    from ssl_em.data.volume import ArrayVolume

    vol = ArrayVolume((np.random.default_rng(0).random((4, 40, 40)) * 255).astype(np.uint8))
    torch.manual_seed(0)
    net = nn.Conv2d(1, 3, 1)
    if rank == 0:
        slow = P._instances
        P._instances = lambda *a, **k: (time.sleep(kw["slow"]), slow(*a, **k))
    shard = P.Shard(rank, world, lambda: dist.monitored_barrier(timeout=timedelta(seconds=kw["barrier_s"])))
    settings = P.PredictSettings(window=32, overlap=8, slab=2, instances="2d", min_size=1)
    P.predict_volume(net, vol, Path(kw["out"]) / "pred.zarr", ["background", "boundary", "interior"], Normalization(0.5, 0.25),
                     settings, "model", progress=False, shard=shard)
    torch.save(time.time(), Path(kw["out"]) / f"predict_done{rank}.pt")


# -- Lightning callbacks the CLI runs take with --trainer.callbacks (tests/ on PYTHONPATH) --
from pytorch_lightning import Callback  # noqa: E402


class AllReduceAtEpochEnd(Callback):
    """A collective at every epoch's end, as epoch-level metrics do: if one rank had a batch
    more than another, the ranks would wait here for each other forever."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        t = torch.tensor([float(trainer.fit_loop.epoch_loop.batch_progress.current.completed)])
        if dist.is_initialized():
            dist.all_reduce(t)
        pl_module.log("batches_all_ranks", t.item(), rank_zero_only=True)


def all_checks(rank: int, world: int, kw: dict) -> None:
    """The three process-group checks of test_distributed.py in one launch: starting Python
    with torch, Lightning and timm costs more than the checks themselves."""
    random_draws(rank, world, kw)
    finetune_ddp(rank, world, kw)
    predict_instances(rank, world, kw)
