"""Fine-tuning throughput: images/s of the training steps of `finetune()` (what `ssl-em
finetune` and every label-efficiency cell run: data, augmentation, logging, Lightning)
against the bare training step of the same network (forward, loss, backward, AdamW on a
fixed random batch), interleaved in one process, at each precision.

    OMP_NUM_THREADS=1 python benchmarks/bench_finetune.py --rounds 2 --steps 40
    python benchmarks/bench_finetune.py --profile        # where finetune()'s time goes
    python benchmarks/bench_finetune.py --op-profile --precision bf16-mixed --steps 4   # by op

Configuration: the label-efficiency benchmark's (`benchmarks/isbi_cnn_label_efficiency.sh`):
ResNet-18 U-Net from scratch, head width 64, batch 4, 128 px tiles, ISBI 2012 slices 0-1,
the whole network trained from the first step. Only training steps are timed (from the
start of step 2 to the end of the last; no validation: holdout 0): the holdout validations
and the final scoring are reported apart by `--profile`.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

ISBI = Path(__file__).resolve().parents[2] / "shared" / "data" / "isbi2012" / "train"


class StepClock(pl.Callback):
    """Wall and CPU time from the start of training step `skip` to the end of the last one."""

    def __init__(self, skip: int = 2) -> None:
        self.skip, self.start, self.wall, self.cpu, self.steps = skip, None, 0.0, 0.0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.skip and self.start is None:
            self.start = (time.perf_counter(), time.process_time())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.start is not None:
            self.wall, self.cpu = time.perf_counter() - self.start[0], time.process_time() - self.start[1]
            self.steps = trainer.global_step - self.skip


def finetune_steps(steps: int, precision: str, clock: StepClock) -> None:
    from ssl_em.finetune.benchmark import head_of_width
    from ssl_em.finetune.cli import finetune

    orig = pl.Trainer.__init__

    def with_clock(self, *a, **kw):  # the clock rides along with finetune()'s own callbacks
        kw["callbacks"] = list(kw.get("callbacks") or []) + [clock]
        orig(self, *a, **kw)

    pl.Trainer.__init__ = with_clock
    # Before issue 21 finetune() took no precision and ran float32 on a CPU.
    chosen = {"precision": precision} if "precision" in inspect.signature(finetune).parameters else {}
    try:
        finetune("resnet18", str(ISBI / "image"), str(ISBI / "label"), "0,1", None, random_init=True, max_steps=steps + clock.skip, head=head_of_width(64),
                 tile_size=128, batch_size=4, unfreeze_at_step=0, lr=1e-3, holdout=0.0, accelerator="cpu",
                 data_kwargs={"classes": ["membrane", "cell"], "label_values": [0, 255]}, **chosen)
    finally:
        pl.Trainer.__init__ = orig


def bare_module(precision: str):
    """The benchmark's network, its optimizer, precision and a fixed batch."""
    from ssl_em.finetune.benchmark import head_of_width
    from ssl_em.finetune.module import SegmentationModule
    from ssl_em.precision import choose

    torch.manual_seed(0)
    m = SegmentationModule(backbone="resnet18", num_classes=2, head=head_of_width(64), random_init=True, unfreeze_at_step=0, backbone_lr_scale=1.0).train()
    setting = choose("cpu", precision)
    opt = m.configure_optimizers()["optimizer"]  # the module's own optimizer (fused or not, its groups)
    setting.apply(m)
    x, y = torch.randn(4, 1, 128, 128), torch.randint(0, 2, (4, 128, 128))
    return m, opt, setting, x, y


def bare_steps(steps: int, precision: str) -> tuple[float, float]:
    m, opt, setting, x, y = bare_module(precision)
    for i in range(steps + 2):
        if i == 2:
            t0, c0 = time.perf_counter(), time.process_time()
        with setting.autocast("cpu"):
            loss = m.loss(m(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, time.process_time() - c0


def op_profile(steps: int, precision: str) -> None:
    """torch.profiler over `steps` bare training steps (after 2 untimed): time by op and by
    phase (forward + loss, backward, optimizer)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    m, opt, setting, x, y = bare_module(precision)

    def step() -> None:
        with record_function("forward+loss"), setting.autocast("cpu"):
            loss = m.loss(m(x), y)
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    print(f"bare step, {precision}, {steps} steps")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=8))


def main() -> None:
    from ssl_em.console import quiet
    from ssl_em.precision import BF16, FP32

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--precision", nargs="+", default=[FP32, BF16])
    p.add_argument("--profile", action="store_true", help="cProfile one finetune() run of --steps steps (first --precision) and print the top entries")
    p.add_argument("--op-profile", action="store_true", help="torch.profiler of --steps bare steps (first --precision), by op")
    a = p.parse_args()
    if a.op_profile:
        return op_profile(a.steps, a.precision[0])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)", flush=True)
    if a.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        with quiet():
            prof.runcall(finetune_steps, a.steps, a.precision[0], StepClock())
        pstats.Stats(prof).sort_stats("cumulative").print_stats(40)
        return
    seen = {s: {"finetune": [], "bare": []} for s in a.precision}
    for r in range(a.rounds):
        for s in a.precision:
            clock = StepClock()
            with quiet():
                finetune_steps(a.steps, s, clock)
            bare = bare_steps(a.steps, s)
            ft = 4 * clock.steps / clock.wall, 4 * clock.steps / clock.cpu
            bb = 4 * a.steps / bare[0], 4 * a.steps / bare[1]
            seen[s]["finetune"].append(ft)
            seen[s]["bare"].append(bb)
            print(f"round {r}: {s:10s} finetune {ft[0]:5.1f} img/s ({ft[1]:5.1f} per CPU-s) | bare step {bb[0]:5.1f} img/s ({bb[1]:5.1f} per CPU-s) | finetune / bare {ft[0] / bb[0]:.3f}", flush=True)
    base = statistics.median(x[1] for x in seen[a.precision[0]]["finetune"]) if seen[a.precision[0]]["finetune"] else None
    for s, v in seen.items():
        fw, fc = statistics.median(x[0] for x in v["finetune"]), statistics.median(x[1] for x in v["finetune"])
        bw, bc = statistics.median(x[0] for x in v["bare"]), statistics.median(x[1] for x in v["bare"])
        print(f"{s:10s} finetune {fw:5.1f} img/s ({fc:5.1f} per CPU-s, {fc / base:.2f}x {a.precision[0]}) | bare {bw:5.1f} img/s ({bc:5.1f} per CPU-s) | finetune / bare {fw / bw:.3f}")


if __name__ == "__main__":
    main()
