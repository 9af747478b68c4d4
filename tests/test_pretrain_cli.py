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

from ssl_em.backbones import BackboneError, load_backbone
from ssl_em.export import read_checkpoint
from ssl_em.pretrain.cli import init_from_export, make_cli, run_argv

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
        # A recipe that names no logger (the CPU recipes choose CSVLogger), by name: the
        # first recipe in sorted order changes as recipes are added.
        make_cli(["--config", str(Path(TINY).parent / "mae_vit_b16.yaml"), "--print_config"])
    assert "WandbLogger" in capsys.readouterr().out


def test_train_then_export(archive, tmp_path):
    run = tmp_path / "run"
    rc = run_argv(["--config", TINY, "--data", str(archive), "--run_dir", str(run), "--trainer.max_steps", "4",
                   "--checkpoint_every_n_steps", "2", "--data.batch_size", "8", *QUIET])
    assert rc == 0
    ckpt = read_checkpoint(run / "checkpoints" / "last.ckpt")  # weights_only=True
    assert ckpt["global_step"] == 4
    assert ckpt["ssl_em"]["recipe"] == "tiny_cpu" and ckpt["ssl_em"]["data_fingerprint"]  # a name, not a path
    assert ckpt["ssl_em"]["recipe_content"].endswith(Path(TINY).read_text())
    assert list((run).rglob("reconstructions/*.png"))
    assert list((run).rglob("reconstructions/step00000004.png"))  # a grid at the final step
    from ssl_em.cli import main

    assert main(["export", str(run), "--out", str(tmp_path / "bb")]) == 0
    model, meta = load_backbone(tmp_path / "bb")
    assert meta.steps == 4 and meta.method == "ssl_em.pretrain.mae.MAE" and meta.img_size == 64 and meta.patch_size == 8
    assert meta.pixel_size_nm == 8.0  # the archive's voxel size, streamed at native resolution
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 96)

    # Continued pretraining: --init_from loads the exported backbone strictly before training,
    # and the method's own weights (MAE's decoder and mask token) the export carries.
    cli = make_cli(["--config", TINY, "--data", str(archive), "--run_dir", str(tmp_path / "more")])
    assert init_from_export(cli.model, tmp_path / "bb") is True
    from ssl_em.pretrain.cli import freeze_steps

    assert freeze_steps(None, cli.model, tmp_path / "bb") == 0  # the decoder is there: nothing to freeze for
    assert all(torch.equal(a, b) for a, b in zip(cli.model.backbone.state_dict().values(), model.state_dict().values()))
    trained = read_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]
    decoder = [k for k in trained if not k.startswith("backbone.")]
    assert decoder and all(torch.equal(cli.model.state_dict()[k], trained[k]) for k in decoder)
    other = make_cli(["--config", TINY.replace("tiny_cpu", "tiny_cpu_moco"), "--data", str(archive), "--run_dir", str(tmp_path / "other")])
    with pytest.raises(BackboneError, match="do not fit"):  # same timm name, other depth
        init_from_export(other.model, tmp_path / "bb")


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--model.init_args.backbone", "vit_tiny_patch16_22"], "did you mean vit_tiny_patch16_224"),
        (["--data.tile_size", "60"], "not divisible by the patch size 8"),
        (["--data.samples_per_epoch", "16", "--data.batch_size", "32"], "batch size 32 is larger"),
        (["--trainer.strategy", "fsdp", "--trainer.accelerator", "cpu"], "strategy FSDPStrategy is not supported; use ddp"),
    ],
    ids=["unknown-backbone", "tile-vs-patch", "batch-too-large", "fsdp"],
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


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _losses(run: Path) -> list[float]:
    """train/loss per step from the run's CSV log (rank 0 writes it)."""
    import csv

    rows = list(csv.DictReader((run / "version_0" / "metrics.csv").open()))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


def _wait(procs: list[subprocess.Popen], timeout: float) -> list[str]:
    """stderr of each; every process is killed if any is still running after `timeout` (a hang)."""
    try:
        errs = [p.communicate(timeout=timeout)[1].decode() for p in procs]
    except subprocess.TimeoutExpired:
        errs = ["hung"]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0] * len(procs), "\n".join(e[-1500:] for e in errs)
    return errs


@pytest.mark.slow
def test_two_epochs_on_two_ranks_then_two_nodes_give_the_same_losses(archive, tmp_path):
    """DDP, 2 CPU processes, max_epochs 2, an all-reduce at each epoch's end (issue 9): 31
    tiles at batch 8 once gave rank 0 two batches and rank 1 one, and the run hung. Then the
    same run as 2 "nodes" on localhost (NODE_RANK 0 and 1, one process each) trains the same:
    same losses, same weights."""
    tests = str(Path(__file__).resolve().parent)
    env = {"PYTHONPATH": os.pathsep.join([str(Path(tests).parent), tests])}
    common = ["--data", str(archive), "--data.batch_size", "8", "--data.samples_per_epoch", "31", "--data.num_workers", "0",
              "--trainer.max_steps", "-1", "--trainer.max_epochs", "2", "--trainer.log_every_n_steps", "1", "--trainer.strategy", "ddp",
              "--trainer.accelerator", "cpu", "--trainer.callbacks", "dist_workers.AllReduceAtEpochEnd", "--model.init_args.image_every_n_steps", "0"]
    one = tmp_path / "one"
    _wait([subprocess.Popen(_cli(*common, "--run_dir", str(one), "--trainer.devices", "2"), env=_env(**env, MASTER_PORT=_free_port()),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)], timeout=150)
    two = tmp_path / "two"
    port = _free_port()
    args = _cli(*common, "--run_dir", str(two), "--trainer.num_nodes", "2", "--trainer.devices", "1")
    procs = [subprocess.Popen(args, env=_env(**env, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(r)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for r in (0, 1)]
    errs = _wait(procs, timeout=150)
    assert "MEMBER: 2/2" in errs[1]
    a, b = read_checkpoint(one / "checkpoints" / "last.ckpt"), read_checkpoint(two / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 2  # 31 // 2 // 8 = 1 batch per rank per epoch
    assert len(_losses(one)) == 2 and _losses(one) == _losses(two)
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k


def test_init_from_without_method_state_freezes_the_backbone_first(archive, tmp_path, capsys):
    """An export without the method's weights (or with --no-method-state): the decoder starts
    fresh and trains alone for --freeze_backbone_steps, the backbone's weights and
    statistics unchanged, then everything trains."""
    from ssl_em.cli import main
    from ssl_em.backbones import METHOD_STATE

    run = tmp_path / "run"
    assert run_argv(["--config", TINY, "--data", str(archive), "--run_dir", str(run), "--trainer.max_steps", "2", "--data.batch_size", "8", *QUIET]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "bb"), "--no-method-state"]) == 0
    assert not (tmp_path / "bb" / METHOD_STATE).exists()
    start, _ = load_backbone(tmp_path / "bb")
    more = tmp_path / "more"
    args = ["--config", TINY, "--data", str(archive), "--run_dir", str(more), "--init_from", str(tmp_path / "bb"), "--data.batch_size", "8",
            "--checkpoint_every_n_steps", "2", *QUIET]
    from ssl_em.pretrain.cli import DEFAULT_FREEZE_STEPS, freeze_steps

    cli = make_cli(["--config", TINY, "--data", str(archive), "--run_dir", str(tmp_path / "probe")])
    assert freeze_steps(None, cli.model, tmp_path / "bb") == DEFAULT_FREEZE_STEPS == 100  # the README's default
    assert freeze_steps(None, cli.model, run.parent / "with_state") == DEFAULT_FREEZE_STEPS  # no export there at all
    assert freeze_steps(7, cli.model, tmp_path / "bb") == 7
    capsys.readouterr()
    assert run_argv([*args, "--trainer.max_steps", "2", "--freeze_backbone_steps", "2", "--trainer.precision", "32-true"]) == 0
    out = capsys.readouterr().out
    assert "decoder starts fresh" in out
    assert "ssl-em pretrain: precision 32-true, contiguous: as requested" in out  # printed once, the override named
    after = {k[len("backbone."):]: v for k, v in read_checkpoint(more / "checkpoints" / "last.ckpt")["state_dict"].items() if k.startswith("backbone.")}
    assert all(torch.equal(after[k], v) for k, v in start.state_dict().items())  # frozen: not a bit moved
    assert run_argv([*args, "--trainer.max_steps", "4", "--freeze_backbone_steps", "2", "--resume"]) == 0
    moved = {k[len("backbone."):]: v for k, v in read_checkpoint(more / "checkpoints" / "last.ckpt")["state_dict"].items() if k.startswith("backbone.")}
    assert not all(torch.equal(moved[k], v) for k, v in start.state_dict().items())  # then it trains


def test_adaptation_recipe_is_the_short_run_the_readme_promises():
    """README: adapt the shipped backbone in 300 steps, at most 30 minutes, a lower peak lr."""
    import yaml

    recipe = yaml.safe_load((Path(TINY).parent / "spark_resnet18_adapt.yaml").read_text())
    assert recipe["trainer"]["max_steps"] == 300 and recipe["trainer"]["max_time"] == "00:00:30:00"
    shipped = yaml.safe_load((Path(TINY).parent / "spark_resnet18_cpu.yaml").read_text())
    assert recipe["model"]["init_args"]["base_lr"] < shipped["model"]["init_args"]["base_lr"]
    assert recipe["model"]["init_args"]["backbone"] == shipped["model"]["init_args"]["backbone"]
