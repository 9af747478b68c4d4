"""What a newcomer meets at the command line: flag order does not matter, help is short and
fast, expected chatter is hidden while real warnings stay, progress counts steps."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from ssl_em import cli_flags
from ssl_em.cli_flags import config_first, expand

ROOT = Path(__file__).resolve().parents[1]
TINY_PRETRAIN = str(ROOT / "recipes" / "pretrain" / "tiny_cpu.yaml")
TINY_FINETUNE = str(ROOT / "recipes" / "finetune" / "tiny_cpu.yaml")


def test_config_goes_first_whatever_the_order():
    argv = ["--max-steps", "10", "--random-init", "--config", "a.yaml", "--x", "1", "-c", "b.yaml", "--config=c.yaml"]
    assert config_first(argv) == ["--config", "a.yaml", "-c", "b.yaml", "--config=c.yaml", "--max-steps", "10", "--random-init", "--x", "1"]


def test_short_flags_expand():
    got = expand(["--random-init", "--classes", "membrane,cell", "--max-steps=5", "--data.tile_size", "64"], cli_flags.FINETUNE)
    assert got == ["--model.random_init", "true", "--data.classes", "[membrane,cell]", "--trainer.max_steps", "5", "--data.tile_size", "64"]
    assert expand(["--data", "a.zarr", "--resume"], cli_flags.PRETRAIN) == ["--data.data", "a.zarr", "--resume", "true"]
    assert expand(["--data", "d.yaml"], cli_flags.PRETRAIN) == ["--data", "d.yaml"]  # a data-group config file


def test_pretrain_config_after_a_flag_does_not_override_it(capsys):
    from ssl_em.pretrain.cli import make_cli

    with pytest.raises(SystemExit):
        make_cli(["--max-steps", "7", "--data", "x.zarr", "--config", TINY_PRETRAIN, "--print_config"])
    printed = capsys.readouterr().out
    assert "max_steps: 7\n" in printed and "data: x.zarr" in printed


def test_finetune_flag_order_and_defaults(synthetic_small, tmp_path, capsys):
    """--config after --max-steps keeps the flag; without a recipe the whole network is
    fine-tuned after a short head warm-up, for a sensible number of steps."""
    import tifffile

    from ssl_em.finetune.cli import MAX_STEPS, build_cli, freeze_plan

    tifffile.imwrite(tmp_path / "im.tif", synthetic_small.image[:4], photometric="minisblack")
    tifffile.imwrite(tmp_path / "lb.tif", synthetic_small.semantic[:4], photometric="minisblack")
    data = ["--backbone", "test_vit", "--images", str(tmp_path / "im.tif"), "--labels", str(tmp_path / "lb.tif"), "--train-slices", "0", "--val-slices", "3"]
    cli = build_cli([*data, "--max-steps", "10", "--random-init", "--config", TINY_FINETUNE])
    assert cli.trainer.max_steps == 10 and cli.model.hparams.random_init

    cli = build_cli([*data, "--classes", "cytoplasm,membrane,mitochondrion"])
    assert cli.trainer.max_steps == MAX_STEPS >= 500
    assert 0 < cli.model.hparams.unfreeze_at_step <= 200  # a warm-up, then the whole network
    assert type(cli.model.net.head).__name__ == "UNETRHead"  # not a linear probe
    assert cli.model.classes == ["cytoplasm", "membrane", "mitochondrion"]
    plan = freeze_plan(cli.model, cli.trainer.max_steps)
    assert "head alone for steps 0-99" in plan and "whole network" in plan and f"steps 100-{MAX_STEPS - 1}" in plan

    probe = build_cli([*data, "--config", str(ROOT / "recipes" / "finetune" / "linear_probe.yaml")])
    assert "frozen for all 500 steps" in freeze_plan(probe.model, probe.trainer.max_steps)


def test_given_keys_are_the_flags_and_recipe_keys_a_user_set(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  lr: 0.01\n  head:\n    init_args: {width: 64}\ntrainer: {max_steps: 5}\n")
    argv, _ = cli_flags.prepare(["--backbone", "b", "--model.unfreeze_at_step=3", "--config", str(recipe)], cli_flags.FINETUNE)
    keys = cli_flags.given_keys(argv)
    assert {"model.backbone", "model.unfreeze_at_step", "model.lr", "model.head.init_args.width", "trainer.max_steps"} <= keys
    assert "model.backbone_lr_scale" not in keys and "config" not in keys
    assert cli_flags.given_keys(["--config", str(tmp_path / "missing.yaml")]) == set()  # jsonargparse reports it


def test_finetune_takes_the_backbones_recommended_settings_unless_the_user_sets_them(synthetic_small, tmp_path, capsys):
    """An export whose ssl_em.json recommends a fine-tuning recipe (SparK's: the whole
    network at full lr from step 0) is fine-tuned so by default; a flag, a recipe file or
    --random-init each keep their own settings."""
    import tifffile
    import timm

    from ssl_em.backbones import BackboneMeta
    from ssl_em.export import export_backbone
    from ssl_em.finetune.cli import build_cli, freeze_plan

    net = timm.create_model("test_resnet", in_chans=1, num_classes=0, pretrained=False)
    export_backbone(net, tmp_path / "cnn", BackboneMeta("test_resnet", model_args={"in_chans": 1}, finetune={"unfreeze_at_step": 0, "backbone_lr_scale": 1.0}))
    tifffile.imwrite(tmp_path / "im.tif", synthetic_small.image[:4], photometric="minisblack")
    tifffile.imwrite(tmp_path / "lb.tif", synthetic_small.semantic[:4], photometric="minisblack")
    data = ["--backbone", str(tmp_path / "cnn"), "--images", str(tmp_path / "im.tif"), "--labels", str(tmp_path / "lb.tif"),
            "--train-slices", "0", "--val-slices", "3", "--tile-size", "64"]

    def settings(*extra):
        cli = build_cli([*data, *extra])
        h = cli.model.hparams
        return h.unfreeze_at_step, h.backbone_lr_scale, freeze_plan(cli.model, cli.trainer.max_steps)

    unfreeze, scale, plan = settings()
    assert (unfreeze, scale) == (0, 1.0) and "whole network (backbone lr x1) trains for all" in plan
    assert settings("--model.unfreeze_at_step", "7")[:2] == (7, 1.0)
    assert settings("--config", str(ROOT / "recipes" / "finetune" / "semantic_cnn.yaml"))[:2] == (200, 0.1)
    assert settings("--random-init")[:2] == (100, None)  # a random init keeps the defaults


def _run(*argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120, cwd=ROOT, **kw)


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_short_help_is_short_fast_and_lists_the_readme_flags(command):
    code = f"import sys; from ssl_em.cli import main; main(['{command}', '--help']); print('LOADED', 'pytorch_lightning' in sys.modules)"
    run = _run("-c", code)
    assert run.returncode == 0, run.stderr
    text = run.stdout
    assert "LOADED False" in text  # printed without importing Lightning
    assert len(text.splitlines()) < 60 and "--help-all" in text and "examples:" in text
    flags = ["--data", "--max-steps", "--resume"] if command == "pretrain" else ["--backbone", "--images", "--labels", "--max-steps", "--classes", "--out"]
    for flag in flags:
        assert f"\n  {flag} " in text, flag
    # a backslash only ever continues a shell line in an example
    assert all(line.endswith("\\") for line in text.splitlines() if "\\" in line)
    assert "configuration file" not in text


def test_help_all_is_lightnings_full_help_with_data_described(capsys):
    from ssl_em.pretrain.cli import make_cli

    with pytest.raises(SystemExit):
        make_cli(["--help-all"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--trainer.max_steps" in text and "--data ARCHIVE an ssl_em archive" in text


def test_quiet_hides_expected_chatter_and_keeps_real_warnings():
    from ssl_em.console import TIPS, quiet

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet():
            warnings.warn("Found 100 module(s) in eval mode at the start of training.")
            warnings.warn("Your `IterableDataset` has `__len__` defined. In combination with...")
            warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
            warnings.warn("You have overridden `on_after_batch_transfer` in `LightningModule` but ...")
            warnings.warn("LightningCLI's args parameter is intended to run from within Python like ...")
            warnings.warn("the loss is NaN")  # a real problem stays visible
        with quiet(verbose=True):
            warnings.warn("Found 3 module(s) in eval mode at the start of training.")
    assert [str(w.message) for w in seen] == ["the loss is NaN", "Found 3 module(s) in eval mode at the start of training."]
    assert TIPS.search("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger](...)")

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("pytorch_lightning")
    logger.addHandler(handler)
    try:
        with quiet():
            logging.getLogger("pytorch_lightning.utilities.rank_zero").warning("💡 Tip: try installing [litlogger]")
            logging.getLogger("pytorch_lightning.utilities.rank_zero").warning("GPU available: False, used: False")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["GPU available: False, used: False"]


def test_finetune_prints_plan_step_progress_and_no_chatter(synthetic_small, tmp_path, capfd):
    import tifffile

    from ssl_em.finetune.cli import run_argv

    tifffile.imwrite(tmp_path / "im.tif", synthetic_small.image[:4, :64, :64], photometric="minisblack")
    tifffile.imwrite(tmp_path / "lb.tif", synthetic_small.semantic[:4, :64, :64], photometric="minisblack")
    argv = ["--max-steps", "4", "--images", str(tmp_path / "im.tif"), "--labels", str(tmp_path / "lb.tif"),
            "--train-slices", "0,1", "--val-slices", "3", "--unfreeze-at-step", "2", "--config", TINY_FINETUNE,
            "--trainer.enable_progress_bar", "true", "--trainer.enable_model_summary", "true"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert run_argv(argv) == 0
    out = "".join(capfd.readouterr()) + "\n".join(str(w.message) for w in seen)
    assert "head alone for steps 0-1 (backbone frozen), then the whole network" in out
    assert "steps: 100%" in out and "4/4 [" in out  # steps out of the total, with an ETA bracket
    assert "Epoch" not in out and "Total Flops" not in out
    for chatter in ("Tip", "litlogger", "module(s) in eval mode", "on_after_batch_transfer", "LightningCLI's args", "LeafSpec"):
        assert chatter not in out, chatter
    assert "nothing written (give --out DIR" in out


def test_demo_keeps_to_free_cores_and_does_not_call_noise_a_gain():
    from ssl_em.demo import threads_for_load, verdict

    assert threads_for_load(2, 0.1) == 2 and threads_for_load(2, 1.6) == 1 and threads_for_load(2, 9.0) == 1
    assert threads_for_load(16, 3.0) == 13
    one_seed = verdict({"mae": {2: (0.002, 0.0, 1, 1)}}, "mean IoU")[0]
    assert "within noise" in one_seed and " a gain" not in one_seed
    assert "cannot tell" in verdict({"mae": {2: (0.05, 0.0, 1, 1)}}, "mean IoU")[0]
    assert "gain beyond" in verdict({"mae": {2: (0.05, 0.01, 4, 4)}}, "mean IoU")[0]
    assert "within seed-to-seed noise" in verdict({"mae": {2: (0.02, 0.04, 2, 4)}}, "mean IoU")[0]


def test_contact_sheet_common_scale_legend_and_whole_captions(tmp_path):
    import numpy as np
    from PIL import Image

    from ssl_em.data.sheets import tile_sheet, wrap

    full, edge = np.full((64, 64), 200, np.uint8), np.full((16, 64), 200, np.uint8)  # an edge tile: 16 rows inside
    plain = tile_sheet([full, edge], None, 2, tmp_path / "a.png", cell=32)
    sheet = np.asarray(Image.open(plain).convert("L"))
    x0 = 32 + 2 * 3  # second cell
    rows_drawn = (sheet[:, x0 + 3 : x0 + 35] == 200).any(1).sum()
    assert rows_drawn == 8  # 16 px at the common 0.5 scale, not magnified to fill the cell
    caption = "kept z12 a-rather-long-image-name-from-the-microscope"
    lines = wrap(caption, 32 * 2)
    assert "".join(lines).replace(" ", "") == caption.replace(" ", "") and len(lines) > 1  # wrapped, nothing cut
    framed = tile_sheet([full, edge], [caption, "pad"], 2, tmp_path / "b.png", cell=32, title="what this is", legend=[("kept", (0, 255, 0)), ("padding", (0, 0, 255))])
    image = np.asarray(Image.open(framed).convert("RGB"))
    legend_row = image[: image.shape[0] - (32 + 2 * 3 + 2 * 14)]  # above the one row of tiles (tile, frame, 2 caption lines)
    assert ((legend_row == (0, 255, 0)).all(-1)).any() and ((legend_row == (0, 0, 255)).all(-1)).any()  # swatches in the image


def test_label_efficiency_plot_names_the_metric_and_keeps_small_differences_small(tmp_path):
    from ssl_em.finetune.benchmark_report import MIN_Y_SPAN, metric_label, plot, y_limits

    assert metric_label("dice/membrane") == "Dice, membrane" and metric_label("mean_iou") == "mean IoU"
    lo, hi = y_limits([0.700], [0.702])  # a 0.002 difference is not a cliff
    assert hi - lo >= MIN_Y_SPAN and lo < 0.700 and hi > 0.702
    assert y_limits([0.98], [1.0]) == (pytest.approx(0.89), 1.0)  # a bounded score stays inside [0, 1]
    assert y_limits([0.0], [0.5])[0] == 0.0
    summary = {"mae": {1: (0.701, 0.001, 2), 2: (0.702, 0.001, 2)}, "random-init (mae arch)": {1: (0.700, 0.001, 2), 2: (0.700, 0.001, 2)}}
    plot(summary, "dice/membrane", tmp_path / "p.png", "ISBI")
    assert (tmp_path / "p.png").stat().st_size > 1000
