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
    python benchmarks/bench_pretrain.py --vs-lightly --rounds 4     # the MAE step against lightly's
    python benchmarks/bench_pretrain.py --vs-lightly --profile      # where ssl_em's MAE step goes

--vs-lightly times bare training steps (forward, loss, backward, AdamW; no Trainer, no
loader) of ssl_em's MAE and of lightly's (`MaskedVisionTransformerTIMM` + `MAEDecoderTIMM`,
its MAE example's step) at an identical configuration: the same timm ViT (ViT-Ti/16 at
128 px by default), decoder width, depth and heads, mask ratio, masked-patch MSE without
normalised pixels, and the same optimizer (fused AdamW, the same parameter groups), in
float32 and under bf16 autocast. Two more arms run each at its default: ssl_em's MAE as
`ssl-em pretrain` runs it here (normalised-pixel loss, precision from
`ssl_em.precision.choose`) and lightly's example as written (float32, torch's default
AdamW). Arms alternate within each round in one process (A, B, C, ... then again), so a
slow spell of a shared machine hits all alike; medians over rounds are reported, per
CPU-second (`time.process_time`) and per wall-clock second. Needs the `bench` extra
(`pip install -e .[bench]`).
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


# -- ssl_em's MAE against lightly's -------------------------------------------------------


def lightly_mae(backbone: str, img_size: int, decoder: dict, mask_ratio: float) -> tuple[torch.nn.Module, callable]:
    """lightly's MAE (its examples/pytorch/mae.py) around a fresh timm ViT: the module and
    its loss as a function of a batch of images (B, 1, H, W)."""
    import warnings

    from lightly.models import utils
    from lightly.models.modules import MAEDecoderTIMM, MaskedVisionTransformerTIMM

    from ssl_em.backbones import build_backbone

    vit = build_backbone(backbone, in_chans=1, img_size=img_size)
    net = torch.nn.Module()
    net.backbone = MaskedVisionTransformerTIMM(vit=vit)
    with warnings.catch_warnings():  # deprecated in favour of MaskedVisionTransformerDecoderTIMM (lightly 1.7)
        warnings.simplefilter("ignore")
        net.decoder = MAEDecoderTIMM(num_patches=vit.patch_embed.num_patches, patch_size=vit.patch_embed.patch_size[0], in_chans=1, embed_dim=vit.embed_dim,
                                     decoder_embed_dim=decoder["decoder_dim"], decoder_depth=decoder["decoder_depth"], decoder_num_heads=decoder["decoder_heads"])
    seq, p = net.backbone.sequence_length, vit.patch_embed.patch_size[0]

    def loss(images: torch.Tensor) -> torch.Tensor:
        B = images.shape[0]
        idx_keep, idx_mask = utils.random_token_mask(size=(B, seq), mask_ratio=mask_ratio, device=images.device)
        x = net.backbone.encode(images=images, idx_keep=idx_keep)
        x = net.decoder.embed(x)
        tokens = utils.set_at_index(utils.repeat_token(net.decoder.mask_token, (B, seq)), idx_keep, x.type_as(net.decoder.mask_token))
        pred = net.decoder.predict(utils.get_at_index(net.decoder.decode(tokens), idx_mask))
        target = utils.get_at_index(utils.patchify(images, p), idx_mask - 1)
        return torch.nn.functional.mse_loss(pred, target)

    return net, loss


def ssl_em_mae(backbone: str, img_size: int, decoder: dict, mask_ratio: float, norm_pix: bool) -> tuple[torch.nn.Module, callable]:
    model = MAE(backbone=backbone, img_size=img_size, mask_ratio=mask_ratio, norm_pix_loss=norm_pix, image_every_n_steps=0, **decoder)
    return model, lambda images: model(images)["loss"]


@dataclass
class Arm:
    """One way of running an MAE training step: a module, its loss, optimizer and precision."""

    name: str
    net: torch.nn.Module
    loss: callable
    optimizer: torch.optim.Optimizer
    bf16: bool

    def step(self, images: torch.Tensor) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.loss(images)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def make_arms(args) -> list[Arm]:
    from ssl_em.pretrain.base import param_groups
    from ssl_em.precision import choose

    decoder = {"decoder_dim": args.decoder_dim, "decoder_depth": args.decoder_depth, "decoder_heads": args.decoder_heads}
    spec = (args.backbone, args.img_size, decoder, 0.75)

    def fused(net):  # what PretrainMethod.configure_optimizers builds
        return torch.optim.AdamW(param_groups(net, 0.05), lr=1e-4, betas=(0.9, 0.95), fused=True)

    default_bf16 = choose("cpu").autocast_dtype is not None
    arms = []
    for bf16 in (False, True):
        tag = "bf16" if bf16 else "fp32"
        net, loss = ssl_em_mae(*spec, norm_pix=False)
        arms.append(Arm(f"ssl_em {tag}", net, loss, fused(net), bf16))
        net, loss = lightly_mae(*spec)
        arms.append(Arm(f"lightly {tag}", net, loss, fused(net), bf16))
    net, loss = ssl_em_mae(*spec, norm_pix=True)
    arms.append(Arm(f"ssl_em default ({'bf16' if default_bf16 else 'fp32'}, norm-pix)", net, loss, fused(net), default_bf16))
    net, loss = lightly_mae(*spec)
    arms.append(Arm("lightly default (fp32, AdamW)", net, loss, torch.optim.AdamW(net.parameters(), lr=1.5e-4), False))
    return arms


def versus_lightly(args) -> None:
    import os
    import statistics

    torch.manual_seed(0)
    arms = make_arms(args)
    images = torch.randn(args.batch or 64, 1, args.img_size, args.img_size)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.backbone} at {args.img_size} px, batch {images.shape[0]}, "
          f"decoder {args.decoder_dim} x {args.decoder_depth} ({args.decoder_heads} heads), load {os.getloadavg()}", flush=True)
    if args.profile:
        return profile_arm(arms[0 if not args.profile_bf16 else 2], images, args)
    for arm in arms:  # warm-up: first-call allocations, oneDNN primitive caches
        for _ in range(args.warmup):
            arm.step(images)
    cpu: dict[str, list[float]] = {a.name: [] for a in arms}
    wall: dict[str, list[float]] = {a.name: [] for a in arms}
    for r in range(args.rounds):
        for arm in arms:
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                arm.step(images)
            cpu[arm.name].append(args.steps * images.shape[0] / (time.process_time() - c0))
            wall[arm.name].append(args.steps * images.shape[0] / (time.perf_counter() - t0))
        print(f"round {r + 1}/{args.rounds}, load {os.getloadavg()[0]:.2f}: " + ", ".join(f"{a.name} {cpu[a.name][-1]:.1f}" for a in arms) + " img per CPU-s", flush=True)
    med = {k: statistics.median(v) for k, v in cpu.items()}
    medw = {k: statistics.median(v) for k, v in wall.items()}
    print(f"\n| arm (median of {args.rounds} rounds) | img per CPU-s | img/s wall |\n|---|---|---|")
    for a in arms:
        print(f"| {a.name} | {med[a.name]:.1f} | {medw[a.name]:.1f} |")

    def ratio(x: str, y: str) -> str:
        per_round = [p / q for p, q in zip(cpu[x], cpu[y])]
        return f"{statistics.median(per_round):.2f}x [{min(per_round):.2f}-{max(per_round):.2f}]"

    print(f"ssl_em / lightly per CPU-second (median per-round ratio [range]): fp32 {ratio('ssl_em fp32', 'lightly fp32')}, "
          f"bf16 {ratio('ssl_em bf16', 'lightly bf16')}, each at its default {ratio(arms[4].name, arms[5].name)}")


def profile_arm(arm: Arm, images: torch.Tensor, args) -> None:
    """torch.profiler table of a few steps of one arm, by op (self CPU time)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    for _ in range(args.warmup):
        arm.step(images)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            with record_function("forward+loss"), torch.autocast("cpu", dtype=torch.bfloat16, enabled=arm.bf16):
                loss = arm.loss(images)
            with record_function("backward"):
                loss.backward()
            with record_function("optimizer"):
                arm.optimizer.step()
                arm.optimizer.zero_grad(set_to_none=True)
    print(f"profile of {arm.name}, {args.steps} steps")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny models for a CPU smoke run")
    p.add_argument("--data", help="archive for the real-stream feed (default: a synthetic one in a temp dir)")
    p.add_argument("--steps", type=int, help="timed steps (default 20; with --vs-lightly 3 per arm and round)")
    p.add_argument("--warmup", type=int, help="untimed steps first (cudnn, compile, loader start; default 5, with --vs-lightly 1)")
    p.add_argument("--batch", type=int, help="per-device batch (default per config)")
    p.add_argument("--num-workers", type=int, default=None, help="loader workers for the real stream (default 8 on GPU, 0 on CPU)")
    p.add_argument("--peak-tflops", type=float, help="device peak for MFU (known GPUs are looked up)")
    p.add_argument("--compile", action="store_true")
    v = p.add_argument_group("--vs-lightly: bare MAE steps, ssl_em against lightly (CPU, one process)")
    v.add_argument("--vs-lightly", action="store_true")
    v.add_argument("--backbone", default="vit_tiny_patch16_224")
    v.add_argument("--img-size", type=int, default=128)
    v.add_argument("--decoder-dim", type=int, default=512)
    v.add_argument("--decoder-depth", type=int, default=8)
    v.add_argument("--decoder-heads", type=int, default=16)
    v.add_argument("--rounds", type=int, default=4)
    v.add_argument("--profile", action="store_true", help="profile ssl_em's float32 arm instead of timing")
    v.add_argument("--profile-bf16", action="store_true", help="with --profile: the bf16 arm")
    v.add_argument("--profile-rows", type=int, default=30)
    args = p.parse_args()
    if args.vs_lightly:
        args.warmup, args.steps = (1 if args.warmup is None else args.warmup), args.steps or 3
        return versus_lightly(args)
    args.warmup, args.steps = (5 if args.warmup is None else args.warmup), args.steps or 20
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
