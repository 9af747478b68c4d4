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


# -- issue 18 / 17: a CNN under DDP (BatchNorm buffers), SparK's SyncBatchNorm, one writer --


class WriteAudit:
    """Records what this process creates, replaces or deletes under `root` (Python's audit
    events: open for writing, mkdir, rename/replace, remove, rmtree), while `on`. Writers
    in C or Rust (safetensors' file) are not seen, but ssl_em writes a folder as a temporary
    one renamed into place, and both the mkdir and the rename are."""

    def __init__(self, root: Path) -> None:
        import sys

        self.root, self.on, self.seen = str(root), False, []
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args) -> None:
        if not self.on:
            return
        if event == "open":
            path, mode, flags = args
            writes = (mode is not None and any(c in str(mode) for c in "wax+")) or (mode is None and isinstance(flags, int) and flags & 0o3)
            paths = [path] if writes else []
        elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"):
            paths = [args[0]]
        elif event in ("os.rename", "shutil.copyfile", "shutil.move"):
            paths = [args[0], args[1]]
        else:
            return
        for p in paths:
            if isinstance(p, (str, bytes, Path)) and str(p if not isinstance(p, bytes) else p.decode()).startswith(self.root):
                self.seen.append(f"{event} {p}")


class RecordFit(Callback):
    """Per rank: training batches, validation batches per validation, each validation's
    val/* metrics (after the module's own epoch end) and the network's weights then; saved
    to `RecordFit.path` when fitting ends. Set `path` before the CLI builds the trainer."""

    path: Path | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.train_batches, self.val_batches, self.validations = 0, 0, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.train_batches += 1

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.val_batches += 1

    def on_validation_end(self, trainer, pl_module) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self.validations.append({"step": int(trainer.global_step), "batches": self.val_batches, "metrics": metrics,
                                 "net": {k: v.detach().clone() for k, v in pl_module.net.state_dict().items()}})
        self.val_batches = 0

    def on_fit_end(self, trainer, pl_module) -> None:
        torch.save({"train_batches": self.train_batches, "validations": self.validations}, RecordFit.path)


def finetune_cnn_cli(rank: int, world: int, kw: dict) -> None:
    """`ssl-em finetune` of a tiny ResNet U-Net under DDP with validation inside fit, twice:
    on 96 x 96 slices, whose validation slice gives 9 tiles of 32 (5 for rank 0, 4 for rank
    1: 3 batches against 2 at batch 2 unless the ranks are evened out), then on 32 x 32
    slices, one validation tile (none for rank 1). Each rank records its batches, metrics
    and weights (RecordFit) and what it wrote under the model folder (WriteAudit)."""
    from ssl_em.finetune.cli import run_argv

    out = Path(kw["out"])
    for name, images, labels in (("", kw["images"], kw["labels"]), ("_small", kw["small_images"], kw["small_labels"])):
        audit = WriteAudit(out / f"model{name}")
        RecordFit.path = out / f"fit{name}{rank}.pt"
        argv = ["--backbone", "test_resnet", "--images", images, "--labels", labels, "--classes", "background,membrane,mito",
                "--train-slices", "0,1", "--val-slices", "2", "--tile-size", "32", "--batch-size", "2", "--max-steps", "4",
                "--data.tiles_per_epoch", "8", "--unfreeze-at-step", "0", "--precision", "32-true", "--out", str(out / f"model{name}"),
                "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu", "--trainer.callbacks", "dist_workers.RecordFit",
                "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
        audit.on = True
        code = run_argv(argv)
        audit.on = False
        torch.save({"code": code, "writes": audit.seen}, out / f"finetune_cli{name}{rank}.pt")


def spark_sync_batchnorm(rank: int, world: int, kw: dict) -> None:
    """One SparK step of a tiny ResNet under DDP with sync_batchnorm, each rank on its own
    two tiles and masks; then, in this process alone, the same step on both ranks' tiles
    and masks concatenated (and on this rank's alone). Saves the BatchNorm running
    statistics and the backbone's gradients of each."""
    import copy

    import pytorch_lightning as pl
    from pytorch_lightning import seed_everything

    import ssl_em.pretrain.spark as S

    class Recording(S.SparK):
        def forward(self, imgs):
            out = super().forward(imgs)
            self.seen = (imgs.detach().clone(), out["mask"].detach().clone())
            return out

    class SyncAfterWrap(pl.Callback):
        # What Lightning's sync_batchnorm does on GPUs. DDP refuses SyncBatchNorm modules on
        # CPU when it wraps the model, so they are swapped in after: the new modules keep the
        # same parameter and buffer tensors, which DDP already holds.
        def on_fit_start(self, trainer, pl_module) -> None:
            pl_module.backbone = torch.nn.SyncBatchNorm.convert_sync_batchnorm(pl_module.backbone)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            dense_norms_eval(pl_module)

    class Grads(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # after DDP's average
            pl_module.grads = {n: p.grad.detach().clone() for n, p in pl_module.backbone.named_parameters() if p.grad is not None}

    def dense_norms_eval(m):
        # The decoder's own (dense) BatchNorms would need torch's SyncBatchNorm, which runs
        # on GPUs only; in eval mode they normalise alike on one rank or two, so the
        # gradients of one process and of two ranks can be compared.
        for mod in m.decoder.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.eval()

    seed_everything(0, verbose=False)
    args = dict(backbone="test_resnet", img_size=64, decoder_width=16, warmup_steps=1)
    model = Recording(**args)
    initial = copy.deepcopy(model.state_dict())
    g = torch.Generator().manual_seed(1)
    # Four tiles of different brightness and contrast: each rank's own statistics differ from
    # the pooled ones. Lightning's sampler gives rank r tiles r and r + 2.
    tiles = [{"image": torch.randn(1, 64, 64, generator=g) * (1 + i) + 2 * i} for i in range(4)]
    loader = torch.utils.data.DataLoader(tiles, batch_size=2)
    _ddp_trainer(max_steps=1, callbacks=[SyncAfterWrap(), Grads()]).fit(model, loader)
    synced = type(model.backbone.bn1).__name__
    stats = lambda m: {n: b.detach().clone() for n, b in m.backbone.named_buffers() if "running" in n}  # noqa: E731
    seen = [None] * world
    dist.all_gather_object(seen, model.seen)

    def one_process(imgs, mask):
        ref = Recording(**args)
        ref.load_state_dict(initial)
        ref.train()
        dense_norms_eval(ref)
        real = S.random_masking
        S.random_masking = lambda *a, **k: (None, mask, None)
        try:
            loss = ref(imgs)["loss"]
        finally:
            S.random_masking = real
        loss.backward()
        return stats(ref), {n: p.grad for n, p in ref.backbone.named_parameters() if p.grad is not None}

    pooled = one_process(torch.cat([s[0] for s in seen]), torch.cat([s[1] for s in seen]))
    alone = one_process(*seen[rank])
    torch.save({"synced_class": synced, "ddp": (stats(model), model.grads), "pooled": pooled, "alone": alone}, Path(kw["out"]) / f"spark_sync{rank}.pt")


def pretrain_and_export_ddp(rank: int, world: int, kw: dict) -> None:
    """`ssl-em pretrain` (tiny SparK recipe, CSV logger, reconstruction previews every step)
    under DDP, then `ssl-em export` run by both ranks: what each rank wrote under the run
    folder and the export folder (WriteAudit)."""
    from ssl_em.cli import main

    out = Path(kw["out"])
    audit = WriteAudit(out / "pt")
    run, export = out / "pt" / "run", out / "pt" / "export"
    argv = ["pretrain", "--config", kw["recipe"], "--data", kw["archive"], "--run_dir", str(run), "--trainer.max_steps", "2",
            "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    audit.on = True
    codes = [main(argv), main(["export", str(run), "--out", str(export)])]
    audit.on = False
    torch.save({"codes": codes, "writes": audit.seen}, out / f"pretrain_export{rank}.pt")


def cnn_checks(rank: int, world: int, kw: dict) -> None:
    """The checks of test_distributed_cnn.py in one launch (Python start-up dominates)."""
    spark_sync_batchnorm(rank, world, kw)
    finetune_cnn_cli(rank, world, kw)
    pretrain_and_export_ddp(rank, world, kw)
    equal_batches(rank, world, {**kw, "batch": 4, "workers": 2, "samples": 31})
