"""Pretraining throughput and model FLOPs utilisation (MFU).

For MAE ViT-B/16 and MoCo v3 ViT-S/16 at 224 px (or tiny CPU variants with --tiny), each
fed two ways: by the real tile stream from an archive (EMDataModule, zarr -> tiles ->
normalised on the device) and by synthetic tensors made on the device (the model alone).
Training runs through the Lightning Trainer exactly as `ssl-em pretrain` does.

MFU = model FLOPs per second / device peak. FLOPs are counted with
torch.utils.flop_counter.FlopCounterMode over one whole training step (forward, backward,
optimizer), so they are the FLOPs the model needs, whatever the kernels do.

    python benchmarks/bench_pretrain.py --device cuda               # bf16 on a GPU
    python benchmarks/bench_pretrain.py --tiny                      # CPU, tiny models
    python benchmarks/bench_pretrain.py --data ARCHIVE.zarr ...     # your archive (else a synthetic one)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset
from torch.utils.flop_counter import FlopCounterMode

from ssl_em.data.stream import EMDataModule
from ssl_em.pretrain.contrastive import MoCoV3
from ssl_em.pretrain.mae import MAE

#: Dense bf16 peak TFLOP/s by device name fragment (no sparsity).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "RTX 4090": 165.0}


@dataclass
class Config:
    name: str
    make: type
    kwargs: dict
    tile: int
    batch: int


FULL = [
    Config("mae_vit_b16", MAE, {"backbone": "vit_base_patch16_224", "image_every_n_steps": 0}, 224, 128),
    Config("mocov3_vit_s16", MoCoV3, {"backbone": "vit_small_patch16_224"}, 224, 128),
]
TINY = [
    Config("mae_tiny", MAE, {"backbone": "vit_tiny_patch16_224", "backbone_kwargs": {"patch_size": 8, "depth": 4, "embed_dim": 96, "num_heads": 3},
                             "decoder_dim": 64, "decoder_depth": 2, "decoder_heads": 2, "image_every_n_steps": 0}, 64, 32),
    Config("mocov3_tiny", MoCoV3, {"backbone": "vit_tiny_patch16_224", "backbone_kwargs": {"patch_size": 8, "depth": 2, "embed_dim": 96, "num_heads": 3},
                                   "hidden_dim": 256, "out_dim": 64}, 32, 32),
]


class _Indices(IterableDataset):
    def __iter__(self):
        while True:
            yield 0


class SyntheticData(pl.LightningDataModule):
    """Batches of standard-normal tiles created directly on the device (no loader, no copy)."""

    def __init__(self, tile: int, batch_size: int) -> None:
        super().__init__()
        self.tile, self.batch_size = tile, batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Indices(), batch_size=None)

    def on_after_batch_transfer(self, batch, dataloader_idx: int) -> dict:
        device = self.trainer.strategy.root_device
        return {"image": torch.randn(self.batch_size, 1, self.tile, self.tile, device=device), "source": torch.zeros(self.batch_size, dtype=torch.long, device=device)}


class Meter(pl.Callback):
    """Counts FLOPs of one step (the first after warm-up) and times the steps after it."""

    def __init__(self, warmup: int, device: torch.device) -> None:
        self.warmup, self.device = warmup, device
        self.flops, self.t0, self.t1, self.steps, self._counter = 0, None, None, 0, None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.warmup:
            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step  # already incremented
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.flops, self._counter = self._counter.get_total_flops(), None
            self._sync()
            self.t0 = time.perf_counter()  # time from the end of the counted step
        elif self.t0 is not None:
            self.steps = step - self.warmup - 1
            self._sync()
            self.t1 = time.perf_counter()


def bench(cfg: Config, data: pl.LightningDataModule, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = cfg.make(img_size=cfg.tile, warmup_steps=1, **cfg.kwargs)
    if args.compile:
        model.compile()
    meter = Meter(args.warmup, device)
    trainer = pl.Trainer(
        accelerator=device.type, devices=1, max_steps=args.warmup + 1 + args.steps, precision="bf16-mixed" if device.type == "cuda" else "32-true",
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[meter],
    )
    trainer.fit(model, datamodule=data)
    seconds = meter.t1 - meter.t0
    images_per_s = meter.steps * cfg.batch / seconds
    flops_per_s = meter.flops * meter.steps / seconds
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if device.type == "cuda" and k in torch.cuda.get_device_name(device)), None)
    return {"images_per_s": images_per_s, "tflops_per_step": meter.flops / 1e12, "tflops_per_s": flops_per_s / 1e12, "mfu": flops_per_s / (peak * 1e12) if peak else None}


def synthetic_archive(folder: Path) -> Path:
    """A synthetic EM volume ingested into an archive (when no --data is given)."""
    from ssl_em.data.ingest import ingest
    from ssl_em.synthetic import make_volume, write

    paths = write(folder / "synthetic", make_volume(shape=(16, 512, 512), seed=0))
    ingest([paths["image"]], folder / "synthetic.zarr", progress=False)
    return folder / "synthetic.zarr"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny models for a CPU smoke run")
    p.add_argument("--data", help="archive for the real-stream feed (default: a synthetic one in a temp dir)")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (cudnn, compile, loader start)")
    p.add_argument("--batch", type=int, help="per-device batch (default per config)")
    p.add_argument("--num-workers", type=int, default=None, help="loader workers for the real stream (default 8 on GPU, 0 on CPU)")
    p.add_argument("--peak-tflops", type=float, help="device peak for MFU (known GPUs are looked up)")
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    device = torch.device(args.device)
    workers = args.num_workers if args.num_workers is not None else (8 if device.type == "cuda" else 0)
    with tempfile.TemporaryDirectory() as tmp:
        archive = args.data or synthetic_archive(Path(tmp))
        print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, archive {archive}")
        print(f"{'config':16s} {'feed':10s} {'batch':>5s} {'img/s':>9s} {'TFLOP/step':>10s} {'TFLOP/s':>8s} {'MFU':>6s}")
        for cfg in TINY if args.tiny else FULL:
            cfg.batch = args.batch or cfg.batch
            feeds = {
                "synthetic": SyntheticData(cfg.tile, cfg.batch),
                "zarr": EMDataModule(str(archive), tile_size=cfg.tile, batch_size=cfg.batch, num_workers=workers,
                                     samples_per_epoch=cfg.batch * (args.warmup + args.steps + 8)),
            }
            for feed, data in feeds.items():
                r = bench(cfg, data, args, device)
                mfu = f"{r['mfu'] * 100:5.1f}%" if r["mfu"] is not None else "   n/a"
                print(f"{cfg.name:16s} {feed:10s} {cfg.batch:5d} {r['images_per_s']:9.1f} {r['tflops_per_step']:10.4f} {r['tflops_per_s']:8.3f} {mfu}", flush=True)


if __name__ == "__main__":
    main()
