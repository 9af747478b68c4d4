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
