"""A backbone says where it comes from: tiles seen, the images they were cut from, and the
exported backbones it continued (`--init_from`), in ssl_em.json and in the model card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pretrain_utils import make_archive

from ssl_em.cli import main
from ssl_em.backbones import BackboneError, load_backbone
from ssl_em.lineage import total_tiles, weights_sha256
from ssl_em.metadata import check_backbone
from ssl_em.pretrain.cli import run_argv

TINY = str(Path(__file__).resolve().parents[1] / "recipes" / "pretrain" / "tiny_cpu.yaml")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.fixture(scope="module")
def two_generations(tmp_path_factory):
    """(parent export, child export): 2 steps of batch 8, then 3 more steps of batch 4
    continued from the parent's export."""
    tmp = tmp_path_factory.mktemp("lineage")
    archive = make_archive(tmp / "em.zarr")
    common = ["--config", TINY, "--data", str(archive), "--checkpoint_every_n_steps", "100", *QUIET]
    assert run_argv([*common, "--run_dir", str(tmp / "a"), "--trainer.max_steps", "2", "--data.batch_size", "8"]) == 0
    assert main(["export", str(tmp / "a"), "--out", str(tmp / "parent")]) == 0
    notes = tmp / "notes.md"
    notes.write_text("## Measured\n\nDice 0.5 on nothing at all (a test).\n")
    assert run_argv([*common, "--run_dir", str(tmp / "b"), "--trainer.max_steps", "3", "--data.batch_size", "4", "--init_from", str(tmp / "parent")]) == 0
    assert main(["export", str(tmp / "b"), "--out", str(tmp / "child"), "--notes", str(notes), "--license", "cc-by-4.0"]) == 0
    return tmp / "parent", tmp / "child", archive


def test_first_generation_records_its_tiles_and_images(two_generations):
    parent, _, archive = two_generations
    _, meta = load_backbone(parent)
    assert meta.tiles == 2 * 8 and meta.lineage == []
    sources = meta.data_sources
    assert sources and abs(sum(s["share"] for s in sources) - 1) < 1e-3
    assert all(s["fingerprint"] and s["source"] for s in sources)
    assert not any(s["source"].startswith("/") for s in sources)  # last path parts, never the machine's path
    assert {s["image"] for s in sources} <= {p.name for p in archive.iterdir()}
    card = (parent / "README.md").read_text()
    assert "## Lineage and training data" in card and "| this backbone | MAE | 2 | 16 |" in card
    assert "Tiles seen in all: 16." in card


def test_continued_backbone_names_its_parent_and_sums_the_tiles(two_generations):
    parent, child, _ = two_generations
    _, meta = load_backbone(child)
    assert meta.steps == 3 and meta.tiles == 3 * 4
    (ancestor,) = meta.lineage
    assert ancestor["name"] == "parent" and ancestor["steps"] == 2 and ancestor["tiles"] == 16
    assert ancestor["weights_sha256"] == weights_sha256(parent / "model.safetensors")
    assert ancestor["data_fingerprint"] == load_backbone(parent)[1].data_fingerprint
    assert total_tiles(meta.tiles, meta.lineage) == 28
    card = (child / "README.md").read_text()
    assert "| parent | MAE | 2 | 16 |" in card and "Tiles seen in all: 28." in card
    assert card.rstrip().endswith("Dice 0.5 on nothing at all (a test).")  # --notes, appended as given


def test_a_stage_without_a_tile_count_makes_the_total_unknown():
    assert total_tiles(10, [{"name": "old", "tiles": None}]) is None
    assert total_tiles(None, []) is None


@pytest.mark.parametrize("key, value", [("lineage", "abc"), ("lineage", [1]), ("tiles", -3), ("data_sources", {"a": 1})])
def test_metadata_refuses_malformed_lineage(key, value):
    with pytest.raises(Exception, match=key):
        check_backbone({"architecture": "resnet18", key: value}, "ssl_em.json")


def test_unreadable_notes_are_one_line_errors(two_generations, tmp_path):
    parent, _, _ = two_generations
    from ssl_em.export import export_run

    bad = tmp_path / "notes.md"
    bad.write_bytes(b"\xff\xfe\x00bad")
    run = parent.parent / "a"
    with pytest.raises(BackboneError, match="--notes .*UTF-8"):
        export_run(run, tmp_path / "out", notes=bad)
    with pytest.raises(BackboneError, match="--notes"):
        export_run(run, tmp_path / "out", notes=tmp_path / "missing.md")
    assert json.loads((parent / "ssl_em.json").read_text())["tiles"] == 16


def test_licence_is_what_the_exporter_states_never_ssl_ems_own(two_generations, tmp_path, capsys):
    """A backbone's weights carry their data's terms: without --license the card says
    `license: other` and why (it said bsd-3-clause, the code's licence); with it, the SPDX
    identifier goes into ssl_em.json, timm's pretrained_cfg and the card's front matter."""
    parent, child, _ = two_generations
    assert load_backbone(parent)[1].license is None
    card = (parent / "README.md").read_text()
    assert "\nlicense: other\n" in card and "| licence | not stated: the weights carry the terms of the data" in card
    assert json.loads((parent / "config.json").read_text())["pretrained_cfg"]["license"] == "other"

    assert load_backbone(child)[1].license == "CC-BY-4.0"
    assert "\nlicense: cc-by-4.0\n" in (child / "README.md").read_text()
    assert json.loads((child / "config.json").read_text())["pretrained_cfg"]["license"] == "cc-by-4.0"

    assert main(["export", str(parent.parent / "a"), "--out", str(tmp_path / "x"), "--license", "BSD-3"]) == 2
    assert "--license BSD-3" in capsys.readouterr().err and not (tmp_path / "x").exists()
