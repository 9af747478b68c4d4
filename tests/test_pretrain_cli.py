"""`ssl-em pretrain`: every recipe parses, the tiny recipes train and export, mistakes are
reported before training, a killed run resumes, and a 2-node launch works on localhost."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from pretrain_utils import make_archive

from ssl_em.export import load_backbone, read_checkpoint
from ssl_em.pretrain.cli import make_cli, run_argv

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes" / "pretrain").glob("*.yaml"))
TINY = str(Path(__file__).resolve().parents[1] / "recipes" / "pretrain" / "tiny_cpu.yaml")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    return make_archive(tmp_path_factory.mktemp("data") / "em.zarr")


def test_recipes_exist():
    names = {p.stem for p in RECIPES}
    assert {"mae_vit_s16", "mae_vit_b16", "mocov3_vit_s16", "moco_resnet50", "simclr_resnet50", "tiny_cpu"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_parses(recipe, capsys):
    """Full validation of the recipe against the typed signatures (no model is built)."""
    with pytest.raises(SystemExit) as e:
        make_cli(["--config", str(recipe), "--data", "x.zarr", "--print_config"])
    assert e.value.code == 0
    printed = capsys.readouterr().out
    assert "class_path: ssl_em.pretrain." in printed and "data: x.zarr" in printed


def test_tiny_recipes_instantiate(tmp_path):
    for name in ("tiny_cpu", "tiny_cpu_moco"):
        cli = make_cli(["--config", TINY.replace("tiny_cpu", name), "--data", "x.zarr", "--run_dir", str(tmp_path / name)])
        assert cli.model.backbone.patch_embed.proj.in_channels == 1
        assert cli.model.hparams.img_size == cli.datamodule.tile_size  # linked from the data
        assert Path(cli.trainer.default_root_dir) == tmp_path / name


def test_default_logger_is_offline_wandb(tmp_path, capsys):
    with pytest.raises(SystemExit):
        make_cli(["--config", str(RECIPES[0]), "--print_config"])
    assert "WandbLogger" in capsys.readouterr().out


def test_train_then_export(archive, tmp_path):
    run = tmp_path / "run"
    rc = run_argv(["--config", TINY, "--data", str(archive), "--run_dir", str(run), "--trainer.max_steps", "4",
                   "--checkpoint_every_n_steps", "2", "--data.batch_size", "8", *QUIET])
    assert rc == 0
    ckpt = read_checkpoint(run / "checkpoints" / "last.ckpt")  # weights_only=True
    assert ckpt["global_step"] == 4
    assert ckpt["ssl_em"]["recipe"] == TINY and ckpt["ssl_em"]["data_fingerprint"]
    assert list((run).rglob("reconstructions/*.png"))
    from ssl_em.cli import main

    assert main(["export", str(run), "--out", str(tmp_path / "bb")]) == 0
    model, meta = load_backbone(tmp_path / "bb")
    assert meta.steps == 4 and meta.method == "ssl_em.pretrain.mae.MAE" and meta.img_size == 64 and meta.patch_size == 8
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 96)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--model.init_args.backbone", "vit_tiny_patch16_22"], "did you mean vit_tiny_patch16_224"),
        (["--data.tile_size", "60"], "not divisible by the patch size 8"),
        (["--data.samples_per_epoch", "16", "--data.batch_size", "32"], "batch size 32 is larger"),
    ],
    ids=["unknown-backbone", "tile-vs-patch", "batch-too-large"],
)
def test_clear_errors_before_training(archive, tmp_path, capsys, extra, message):
    rc = run_argv(["--config", TINY, "--data", str(archive), "--run_dir", str(tmp_path / "run"), *extra])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_error_when_curation_left_nothing(tmp_path, capsys):
    empty = make_archive(tmp_path / "empty.zarr", flag_all=True)
    assert run_argv(["--config", TINY, "--data", str(empty), "--run_dir", str(tmp_path / "run")]) == 2
    assert "nothing is left" in capsys.readouterr().err


def test_resume_refuses_other_architecture(archive, tmp_path, capsys):
    run = ["--config", TINY, "--data", str(archive), "--run_dir", str(tmp_path / "run"), "--data.batch_size", "8", *QUIET]
    assert run_argv([*run, "--trainer.max_steps", "2", "--checkpoint_every_n_steps", "2"]) == 0
    assert run_argv([*run, "--resume", "--model.init_args.backbone_kwargs", "{patch_size: 8, depth: 3, embed_dim: 96, num_heads: 3}"]) == 2
    assert "was trained with model_args" in capsys.readouterr().err


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ssl_em.cli", "pretrain", "--config", TINY, *args, *QUIET]


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


@pytest.mark.slow
def test_resume_after_kill(archive, tmp_path):
    """kill -9 mid-run, then --resume: the step count carries on from the last checkpoint."""
    run = tmp_path / "run"
    args = ["--data", str(archive), "--run_dir", str(run), "--data.batch_size", "8", "--trainer.log_every_n_steps", "1"]
    proc = subprocess.Popen(_cli(*args, "--trainer.max_steps", "1000", "--checkpoint_every_n_steps", "3"), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.time() + 60
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert last.exists(), proc.stderr.read().decode()[-2000:]
    killed_at = read_checkpoint(last)["global_step"]
    assert 3 <= killed_at < 1000
    subprocess.run(_cli(*args, "--resume", "--trainer.max_steps", str(killed_at + 4), "--checkpoint_every_n_steps", "1000"),
                   env=_env(), check=True, capture_output=True)
    assert read_checkpoint(last)["global_step"] == killed_at + 4
    (metrics,) = run.glob("version_*/metrics.csv")  # the resumed run appended to the run's metrics file
    import csv

    with open(metrics, newline="") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("step")]
    assert steps == sorted(steps) and max(steps) >= killed_at  # no step logged twice, none replayed from 0


@pytest.mark.slow
def test_two_nodes_on_localhost(archive, tmp_path):
    """num_nodes=2, one CPU device each, gloo: two processes with NODE_RANK 0 and 1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    args = _cli("--data", str(archive), "--run_dir", str(tmp_path / "run"), "--data.batch_size", "8", "--trainer.max_steps", "3",
                "--trainer.num_nodes", "2", "--trainer.devices", "1", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu")
    procs = [subprocess.Popen(args, env=_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(r)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for r in (0, 1)]
    try:
        errs = [p.communicate(timeout=90)[1].decode() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(e[-1500:] for e in errs)
    assert "MEMBER: 2/2" in errs[1]
    assert read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 3
