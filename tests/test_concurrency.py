"""Concurrent and killed runs: one writer per image, a killed writer's lock goes with it,
two ingests into one archive (one killed with SIGKILL mid-way) leave only images identical
to a one-process ingest, and a killed prediction resumes to the uninterrupted result."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ssl_em.data.archive import Archive, ImageBusyError, ImageLock


def _env() -> dict:
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_second_writer_of_an_image_is_refused_by_name(tmp_path):
    first, second = ImageLock(tmp_path, "img"), ImageLock(tmp_path, "img")
    first.acquire("/data/a.tif")
    with pytest.raises(ImageBusyError, match=rf"img: being written by pid {os.getpid()} on .* \(source /data/a.tif\)"):
        second.acquire("/data/a.tif")
    assert second.holder()["source"] == "/data/a.tif"
    ImageLock(tmp_path, "other").acquire("/data/b.tif")  # other images stay free
    first.release()
    assert second.holder() is None
    second.acquire("/data/a.tif")
    second.release()


def test_a_killed_writer_does_not_hold_its_lock(tmp_path):
    code = f"from ssl_em.data.archive import ImageLock; ImageLock({str(tmp_path)!r}, 'img').acquire('src'); print('held', flush=True); import time; time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        lock = ImageLock(tmp_path, "img")
        with pytest.raises(ImageBusyError, match=f"pid {proc.pid}"):
            lock.acquire("src")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    lock.acquire("src")  # the kernel dropped the dead process's lock
    lock.release()


def _sources(folder: Path, n: int) -> list[str]:
    import tifffile

    folder.mkdir()
    paths = []
    for i in range(n):
        # Noise over a gradient: every tile informative and distinct, made in milliseconds.
        rng = np.random.default_rng(i)
        image = rng.integers(0, 120, (4, 320, 320)) + np.linspace(0, 120, 320)[None, None, :]
        p = folder / f"s{i}.tif"
        tifffile.imwrite(p, image.astype(np.uint8), photometric="minisblack")
        paths.append(str(p))
    return paths


def _same_image(a, b) -> None:
    assert a.meta["source_fingerprint"] == b.meta["source_fingerprint"]
    assert a.meta["stats"] == b.meta["stats"] and a.meta["curation"]["counts"] == b.meta["curation"]["counts"]
    assert len(a.levels) == len(b.levels)
    for la, lb in zip(a.levels, b.levels):
        np.testing.assert_array_equal(la.read(), lb.read())
    np.testing.assert_array_equal(a.curation, b.curation)


@pytest.mark.slow
def test_two_ingests_one_killed_leave_only_correct_images(tmp_path):
    from ssl_em.data.ingest import ingest

    sources = _sources(tmp_path / "src", 6)
    ref = ingest(sources, tmp_path / "ref.zarr", tile_size=128, progress=False, workers=1)
    assert not ref.failed
    reference = {im.name: im for im in Archive(tmp_path / "ref.zarr").images}
    out = tmp_path / "shared.zarr"
    cmd = [sys.executable, "-m", "ssl_em.cli", "ingest", "--out", str(out), "--tile-size", "128", "--quiet", "--workers", "1"]
    a = subprocess.Popen(cmd + sources, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    b = subprocess.Popen(cmd + sources[::-1], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and a.poll() is None and not (out.is_dir() and Archive.is_archive(out) and Archive(out).images):
        time.sleep(0.05)
    a.send_signal(signal.SIGKILL)  # mid-way: at least one image done, others in progress
    a.wait()
    b_err = b.communicate(timeout=120)[1]
    # B was refused only images A was writing, each in one line naming A's pid.
    refused = [line for line in b_err.splitlines() if "being written by" in line]
    assert all(f"pid {a.pid}" in line for line in refused), b_err
    for im in Archive(out).images:  # whatever is marked complete is exactly the reference
        _same_image(im, reference[im.name])
    # A re-run finishes what the killed process left, and changes nothing else.
    assert subprocess.run(cmd + sources, env=_env(), capture_output=True).returncode == 0
    done = Archive(out)
    assert sorted(im.name for im in done.images) == sorted(reference) and not done.incomplete
    for im in done.images:
        _same_image(im, reference[im.name])


def _losses(run: Path) -> tuple[list[int], dict[int, float]]:
    import csv

    (metrics,) = run.rglob("metrics.csv")  # one metrics file: a resumed run appends to it
    with open(metrics, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    steps = [int(r["step"]) for r in rows]
    return steps, {int(r["step"]): float(r["train/loss"]) for r in rows}


def test_resumed_pretraining_continues_the_stream_and_the_metrics_file(tmp_path):
    """Stopped at step 4 (mid-epoch: 6 batches an epoch) and resumed to step 8: the same
    losses as an uninterrupted 8-step run, in the same metrics file, no step logged twice."""
    from pretrain_utils import make_archive

    from ssl_em.pretrain.cli import run_argv

    archive = make_archive(tmp_path / "em.zarr")
    tiny = str(Path(__file__).resolve().parents[1] / "recipes" / "pretrain" / "tiny_cpu.yaml")

    def train(run: str, steps: int, *extra: str) -> None:
        assert run_argv(["--config", tiny, "--data", str(archive), "--run_dir", str(tmp_path / run), "--data.batch_size", "8",
                         "--data.samples_per_epoch", "48", "--trainer.max_steps", str(steps), "--checkpoint_every_n_steps", "4",
                         "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
                         "--trainer.enable_model_summary", "false", "--model.init_args.image_every_n_steps", "1000",
                         "--model.init_args.backbone_kwargs", "{patch_size: 8, depth: 1, embed_dim: 48, num_heads: 3}",
                         "--model.init_args.decoder_depth", "1", *extra]) == 0

    train("whole", 8)
    train("split", 4)
    train("split", 8, "--resume")
    steps, resumed = _losses(tmp_path / "split")
    _, whole = _losses(tmp_path / "whole")
    assert steps == sorted(set(steps)) and len(steps) == 8
    assert resumed == pytest.approx(whole, rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_killed_prediction_resumes_to_the_uninterrupted_result(tmp_path):
    """kill -9 `ssl-em predict` after a few slabs, run it again: the same store, byte for byte
    in every array, as one uninterrupted run."""
    import tifffile
    import zarr
    from test_bad_input import tiny_models

    from ssl_em.cli import main

    tiny_models(tmp_path / "bb", tmp_path / "model")
    volume = tmp_path / "v.tif"
    tifffile.imwrite(volume, np.random.default_rng(0).integers(0, 255, (16, 64, 64), dtype=np.uint8), photometric="minisblack")
    args = lambda out: ["predict", str(tmp_path / "model"), str(volume), "--out", str(out), "--slab", "1", "--batch-size", "1",  # noqa: E731
                        "--no-progress", "--accelerator", "cpu"]
    killed = tmp_path / "killed.zarr"
    proc = subprocess.Popen([sys.executable, "-m", "ssl_em.cli", *args(killed)], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(list((killed / ".progress" / "xy").glob("*"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(list((killed / ".progress" / "xy").glob("*")))
    assert 2 <= finished < 16, proc.stderr.read().decode()[-2000:]  # killed mid-way
    assert main(args(killed)) == 0
    assert main(args(tmp_path / "whole.zarr")) == 0
    a, b = zarr.open_group(str(killed), mode="r"), zarr.open_group(str(tmp_path / "whole.zarr"), mode="r")
    for name in ("0", "labels/semantic/0"):
        np.testing.assert_array_equal(a[name][...], b[name][...])
    assert a.attrs["ssl_em"]["complete"]
