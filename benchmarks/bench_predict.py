"""Whole-volume `ssl-em predict` against the bare forward of the same network over the same
windows (same precision, same batch), interleaved in one process, and peak memory against
volume size (each size a fresh `ssl-em predict` process).

    OMP_NUM_THREADS=1 python benchmarks/bench_predict.py --model MODEL_DIR --rounds 2
    python benchmarks/bench_predict.py --model MODEL_DIR --memory 10,30,90 --rounds 0

--model: a fine-tuned model folder (`ssl-em finetune --out`); --input: the volume (default
the ISBI 2012 test stack, 30 x 512 x 512). The command is run in-process through
`ssl_em.cli.main` (imports already paid; the one-off start-up of a fresh `ssl-em predict` is
measured by the --memory runs). The bare forward is what no pipeline can beat: every window
cut out and standardised beforehand (not timed), then `net(batch)` under the same autocast
and layout, nothing else. Reported per setting, median over rounds: wall seconds of each,
their ratio, windows per second, and windows per CPU-second (`time.process_time`, every
thread of the process).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ISBI_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "isbi2012" / "test"


def supports_precision_flag() -> bool:
    from ssl_em.inference import predict

    p = argparse.ArgumentParser()
    predict.configure(p)
    return "--precision" in p._option_string_actions


def predict_args(model: str, volume: str, out: str, batch: int, setting: str | None) -> list[str]:
    extra = ["--precision", setting] if setting and supports_precision_flag() else []
    return ["predict", model, volume, "--out", out, "--overwrite", "--no-progress", "--batch-size", str(batch), "--accelerator", "cpu", *extra]


def windows_of(model: str, volume: str) -> tuple[torch.Tensor, int]:
    """Every xy window `ssl-em predict` runs, standardised as it does: (N, 1, w, w) float32."""
    from ssl_em.data.normalize import normalize_numpy
    from ssl_em.data.normalize import sample_stats
    from ssl_em.data.readers.open import as_volume
    from ssl_em.finetune.model_folder import load_finetuned
    from ssl_em.inference.window import window_starts

    _, meta = load_finetuned(model)
    vol = as_volume(volume)
    w = meta.tile_size
    stride = w - w // 4
    stats = sample_stats(vol)
    out = []
    for z in range(vol.shape[0]):
        img = normalize_numpy(vol.read(z)[0], stats, meta.norm).astype(np.float32)
        H, W = img.shape
        out += [img[y : y + w, x : x + w] for y in window_starts(H, w, stride) for x in window_starts(W, w, stride)]
    return torch.from_numpy(np.stack(out)[:, None]), w


def bare_forward(model: str, windows: torch.Tensor, batch: int, setting) -> tuple[float, float]:
    """(wall s, CPU s) of the network alone over `windows`, batch by batch."""
    from ssl_em.finetune.model_folder import load_finetuned

    net, _ = load_finetuned(model)
    net = setting.apply(net).eval()
    with torch.no_grad(), setting.autocast("cpu"):
        net(windows[:batch])  # warm-up: oneDNN picks its kernels
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(0, len(windows), batch):
            net(windows[i : i + batch]).float().softmax(1)
    return time.perf_counter() - t0, time.process_time() - c0


def stack(folder: Path, n: int) -> Path:
    """A folder of n ISBI test slices (symlinks; the 30 slices repeated along z past 30)."""
    files = sorted(ISBI_TEST.glob("*.png"), key=lambda p: int(p.stem))
    out = folder / f"vol{n}"
    out.mkdir()
    for z in range(n):
        (out / f"{z}.png").symlink_to(files[z % len(files)])
    return out


def memory_runs(model: str, sizes: list[int], batch: int, setting: str | None) -> None:
    """A fresh `ssl-em predict` per volume size (the ISBI slices repeated along z): start-up
    included, peak RSS of the process (wait4)."""
    with tempfile.TemporaryDirectory(prefix="bench_predict_") as tmp:
        for n in sizes:
            folder = stack(Path(tmp), n)
            cmd = [sys.executable, "-m", "ssl_em.cli", *predict_args(model, str(folder), str(Path(tmp) / f"out{n}.zarr"), batch, setting)]
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=os.environ)
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - t0
            said = proc.stdout.read().decode().strip().splitlines()
            if status:
                raise SystemExit(f"{cmd} failed:\n" + "\n".join(said[-20:]))
            print(f"memory {n:4d} x 512 x 512 ({setting or 'default'}): wall {wall:6.1f} s, CPU {usage.ru_utime + usage.ru_stime:6.1f} s, peak RSS {usage.ru_maxrss / 1024:6.0f} MB"
                  f"{'  | ' + said[0] if said and 'precision' in said[0] else ''}", flush=True)


def agreement(tmp: Path, settings: list[str]) -> None:
    """Dice per class between the label maps the first setting and each other one wrote."""
    import zarr

    if len(settings) < 2 or not (tmp / f"{settings[0]}.zarr").is_dir():
        return
    ref = zarr.open_group(str(tmp / f"{settings[0]}.zarr"), mode="r")["labels/semantic/0"][:]
    for s in settings[1:]:
        got = zarr.open_group(str(tmp / f"{s}.zarr"), mode="r")["labels/semantic/0"][:]
        dice = {int(k): 2 * ((ref == k) & (got == k)).sum() / ((ref == k).sum() + (got == k).sum()) for k in np.unique(ref)}
        print(f"labels {s} vs {settings[0]}: Dice per stored class {', '.join(f'{k}: {d:.4f}' for k, d in dice.items())}; pixels that differ {(ref != got).mean():.4%}", flush=True)


def main() -> None:
    from ssl_em import cli
    from ssl_em.precision import BF16, FP32, Precision

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--input", default=str(ISBI_TEST))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--precision", nargs="+", default=[FP32, BF16])
    p.add_argument("--slices", type=int, default=None, help="time the first N slices of the ISBI test stack only (a busy machine)")
    p.add_argument("--memory", default="", help="volume sizes (slices) for the peak-memory runs, e.g. 10,30,90")
    a = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), precision flag in ssl-em predict: {supports_precision_flag()}", flush=True)
    keep = tempfile.TemporaryDirectory(prefix="bench_predict_in_")
    if a.slices:
        a.input = str(stack(Path(keep.name), a.slices))
    if a.rounds:
        windows, _ = windows_of(a.model, a.input)
        print(f"{len(windows)} windows of {tuple(windows.shape[2:])}, batch {a.batch_size}", flush=True)
    seen = {s: {"predict": [], "bare": []} for s in a.precision}
    with tempfile.TemporaryDirectory(prefix="bench_predict_") as tmp:
        for r in range(a.rounds):
            for s in a.precision:
                setting = Precision(s, False, s)
                bare = bare_forward(a.model, windows, a.batch_size, setting)
                t0, c0 = time.perf_counter(), time.process_time()
                rc = cli.main(predict_args(a.model, a.input, str(Path(tmp) / f"{s}.zarr"), a.batch_size, s))
                pred = (time.perf_counter() - t0, time.process_time() - c0)
                assert rc == 0, rc
                seen[s]["predict"].append(pred)
                seen[s]["bare"].append(bare)
                print(f"round {r}: {s:10s} predict {pred[0]:6.1f} s wall {pred[1]:6.1f} s CPU | bare forward {bare[0]:6.1f} s wall {bare[1]:6.1f} s CPU | ratio {pred[0] / bare[0]:.3f}", flush=True)
        agreement(Path(tmp), a.precision)
    for s, v in seen.items():
        if not v["predict"]:
            continue
        pw, pc = statistics.median(x[0] for x in v["predict"]), statistics.median(x[1] for x in v["predict"])
        bw, bc = statistics.median(x[0] for x in v["bare"]), statistics.median(x[1] for x in v["bare"])
        n = len(windows)
        print(f"{s:10s} predict {pw:6.1f} s ({n / pw:5.1f} windows/s, {n / pc:5.1f} per CPU-s) | bare {bw:6.1f} s ({n / bw:5.1f} windows/s, {n / bc:5.1f} per CPU-s) | ratio {pw / bw:.3f} (CPU {pc / bc:.3f})")
    if a.memory:
        for s in a.precision:
            memory_runs(a.model, [int(n) for n in a.memory.split(",")], a.batch_size, s)


if __name__ == "__main__":
    main()
