"""Training-step throughput of the networks ssl_em trains, float32 against bf16 autocast with
and without channels_last, interleaved in one process (rounds alternate the settings, so
load changes hit all of them alike). Reports images/s per setting, median over rounds.

    OMP_NUM_THREADS=1 python benchmarks/bench_precision.py --rounds 4 --steps 6
    python benchmarks/bench_precision.py --only spark_resnet18

The networks: SparK's ResNet-18 pretraining step (128 px, batch 32), the fine-tuning step of
a ResNet-18 U-Net (the benchmark's configuration: 128 px, batch 4, head width 64) and the
MAE ViT step (ViT-Ti/16, 128 px, batch 64).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ssl_em.precision import BF16, FP32, Precision


def spark_step():
    from ssl_em.pretrain.spark import SparK

    m = SparK(backbone="resnet18", img_size=128, decoder_width=128)
    return m, lambda: m(torch.randn(32, 1, 128, 128))["loss"], 32


def unet_step():
    from ssl_em.finetune.benchmark import head_of_width
    from ssl_em.finetune.module import SegmentationModule

    m = SegmentationModule(backbone="resnet18", num_classes=2, head=head_of_width(64), unfreeze_at_step=0, backbone_lr_scale=1.0)
    x, y = torch.randn(4, 1, 128, 128), torch.randint(0, 2, (4, 128, 128))
    return m, lambda: m.loss(m(x), y), 4


def mae_step():
    from ssl_em.pretrain.mae import MAE

    m = MAE(backbone="vit_tiny_patch16_224", img_size=128, image_every_n_steps=0)
    return m, lambda: m(torch.randn(64, 1, 128, 128))["loss"], 64


NETS = {"spark_resnet18": spark_step, "unet_resnet18_finetune": unet_step, "mae_vit_tiny": mae_step}
SETTINGS = [Precision(FP32, False, "float32"), Precision(BF16, False, "bf16"), Precision(BF16, True, "bf16 + channels_last")]


def images_per_s(build, setting: Precision, steps: int) -> float:
    torch.manual_seed(0)
    model, loss_fn, batch = build()
    model = setting.apply(model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for i in range(steps + 1):  # the first step warms up kernels and is not timed
        if i == 1:
            start = time.perf_counter()
        with setting.autocast("cpu"):
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--only", nargs="*", default=list(NETS))
    a = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), capability {torch.backends.cpu.get_cpu_capability()}")
    for name in a.only:
        seen = {s.why: [] for s in SETTINGS}
        for _ in range(a.rounds):
            for s in SETTINGS:
                seen[s.why].append(images_per_s(NETS[name], s, a.steps))
        base = statistics.median(seen["float32"])
        for why, v in seen.items():
            med = statistics.median(v)
            print(f"{name:24s} {why:22s} {med:7.1f} img/s  {med / base:4.2f}x float32  (rounds: {', '.join(f'{x:.1f}' for x in v)})", flush=True)


if __name__ == "__main__":
    main()
