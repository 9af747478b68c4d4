"""Helpers shared by the pretraining tests: a tiny archive and tiny model settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: A 2-block, 48-wide ViT with 8 px patches: a few thousand parameters, milliseconds a step.
TINY_VIT = {"patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3}


def make_archive(path: Path, shape=(4, 128, 128), flag_all: bool = False, seed: int = 0) -> Path:
    """A one-image ssl_em archive of synthetic EM, written with ArchiveWriter directly.
    flag_all marks every curation tile as low-information (nothing left to train on)."""
    from ssl_em.data.archive import ArchiveWriter, TileFlag
    from ssl_em.data.normalize import IntensityStats
    from ssl_em.data.volume import VoxelSize
    from ssl_em.synthetic import make_volume

    em = make_volume(shape=shape, seed=seed)
    t = 64
    cur_shape = (shape[0], -(-shape[1] // t), -(-shape[2] // t))
    n = int(np.prod(cur_shape))
    meta = {
        "source": "synthetic", "source_format": "synthetic", "source_fingerprint": f"synthetic-{seed}",
        "shape": list(shape), "dtype": "uint8", "voxel_size_nm": [8.0, 8.0, 8.0], "voxel_size_known": True,
        "stats": IntensityStats.compute(em.image).to_dict(),
        "curation": {"tile_size": t, "dhash_max_distance": 0,
                     "counts": {"kept": 0 if flag_all else n, "low_information": n if flag_all else 0, "saturated": 0, "padding": 0, "duplicate": 0}},
    }
    w = ArchiveWriter(path)
    arrays = w.create_image("synthetic", [shape], [VoxelSize(8.0, 8.0, 8.0)], "uint8", (1, 128, 128), cur_shape, meta)
    arrays[0][...] = em.image
    if flag_all:
        w.curation_array("synthetic")[...] = int(TileFlag.LOW_INFORMATION)
    w.finish("synthetic", meta)
    w.close()
    return path



def fixed_batch_losses(model, x, steps: int, lr: float = 2e-3) -> list[float]:
    """Train `model` (a method returning {"loss"}) on one batch x for `steps` AdamW steps,
    cycling through 4 fixed random draws (masks) by re-keying its generators, as
    pretraining's SeedPerRank does per step; returns the losses."""
    import torch

    from ssl_em.seeding import generators_in

    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        for g in generators_in(model):
            g.at_step(step % 4)  # a few fixed masks
        loss = model(x)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
