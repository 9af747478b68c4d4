"""bioimage.io export, checked by bioimageio.core's own model test (both weight formats:
TorchScript and the state dict with its architecture), with a tiny CNN at 32 px tiles.

SLOW: bioimageio.core is heavy (xarray, dask, pydantic models, and its determinism switch
imports torch's compiler stack): one model test of a 1-step model, marked `slow`. The module
is skipped without bioimageio.core."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "finetune"
bioimageio_core = pytest.importorskip("bioimageio.core", reason="bioimageio.core (dev extra) runs bioimage.io's model test")


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """`ssl-em finetune --bioimageio`: 1 step of the tiny ViT recipe (64 px tiles) on
    synthetic EM with real voxel sizes (50 x 4 x 4 nm)."""
    import tifffile

    from ssl_em.finetune.cli import run_argv
    from ssl_em.synthetic import make_volume

    em = make_volume(shape=(6, 64, 64), seed=1)
    d = tmp_path_factory.mktemp("bioimageio")
    kw = {"resolution": (1e3 / 4, 1e3 / 4), "imagej": True, "metadata": {"spacing": 0.05, "unit": "um", "axes": "ZYX"}}
    tifffile.imwrite(d / "image.tif", em.image, photometric="minisblack", **kw)
    tifffile.imwrite(d / "labels.tif", em.semantic, photometric="minisblack")
    argv = ["--config", str(RECIPES / "tiny_cpu.yaml"), "--images", str(d / "image.tif"), "--labels", str(d / "labels.tif"),
            "--train-slices", "0,1", "--val-slices", "5", "--max-steps", "1", "--data.classes=[cytoplasm,membrane,mitochondrion]",
            "--out", str(d / "model"), "--bioimageio", str(d / "from_finetune"), "--license", "CC-BY-4.0"]
    assert run_argv(argv) == 0
    return d


@pytest.mark.slow
def test_export_passes_bioimageio_model_test(finetuned, tmp_path):
    import yaml
    from bioimageio.core import test_model

    from ssl_em.cli import main

    out = tmp_path / "bmz"
    assert main(["export-model", str(finetuned / "model"), "--format", "bioimageio", "--sample", str(finetuned / "image.tif"),
                 "--out", str(out), "--author", "A. Tester", "--license", "MIT"]) == 0
    summary = test_model(out / "bioimageio.yaml", devices=["cpu"])
    assert summary.status in ("passed", "valid-format"), summary.display() or summary.format()
    assert {d.name for d in summary.details if "Reproduce test outputs" in d.name}, [d.name for d in summary.details]

    rdf = yaml.safe_load((out / "bioimageio.yaml").read_text())
    assert set(rdf["weights"]) == {"torchscript", "pytorch_state_dict"}
    y = rdf["inputs"][0]["axes"][2]
    assert y["unit"] == "nanometer" and y["scale"] == 4.0
    assert rdf["outputs"][0]["axes"][1]["channel_names"] == ["cytoplasm", "membrane", "mitochondrion"]
    assert [p["id"] for p in rdf["inputs"][0]["preprocessing"]][1:] == ["scale_range", "clip", "fixed_zero_mean_unit_variance"]
    assert rdf["cite"] and (out / "cover.png").is_file()
    # the test input is real data: the sample's middle slice, not noise
    x = np.load(out / "test_input.npy")
    assert x.shape == (1, 1, 64, 64) and len(np.unique(x)) > 16
    probs = np.load(out / "test_output.npy")
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)

    # `finetune --bioimageio` wrote the same model from the same training images
    for name in ("test_input.npy", "test_output.npy"):
        np.testing.assert_array_equal(np.load(finetuned / "from_finetune" / name), np.load(out / name))
    assert yaml.safe_load((finetuned / "from_finetune" / "bioimageio.yaml").read_text())["weights"].keys() == rdf["weights"].keys()


def test_rdf_holds_no_local_path_or_login_name(finetuned):
    """`finetune --bioimageio` (no --author): the rdf named the backbone by its absolute path
    on the training machine and the login name as the author."""
    import getpass

    import yaml

    text = (finetuned / "from_finetune" / "bioimageio.yaml").read_text()
    rdf = yaml.safe_load(text)
    assert str(finetuned) not in text and "/" not in rdf["weights"]["pytorch_state_dict"]["architecture"]["kwargs"]["meta"]["backbone_source"]
    assert [a["name"] for a in rdf["authors"]] != [getpass.getuser()]


def test_licence_is_stated_or_inherited_never_assumed(finetuned, tmp_path, capsys):
    """The weights' licence: --license as given; else the pretrained backbone's stated one;
    else refused by name (it was BSD-3-Clause, ssl_em's code licence, whatever the data)."""
    import json
    import shutil

    import yaml

    from ssl_em.cli import main

    assert yaml.safe_load((finetuned / "from_finetune" / "bioimageio.yaml").read_text())["license"] == "CC-BY-4.0"
    args = ["--format", "bioimageio", "--sample", str(finetuned / "image.tif")]
    # the tiny recipe's backbone is a timm name: no stated licence to inherit
    assert main(["export-model", str(finetuned / "model"), *args, "--out", str(tmp_path / "none")]) == 2
    assert "--license" in capsys.readouterr().err and not (tmp_path / "none" / "bioimageio.yaml").exists()

    model = tmp_path / "model"
    shutil.copytree(finetuned / "model", model)
    meta_file = model / "ssl_em_finetuned.json"
    meta = json.loads(meta_file.read_text())
    meta["backbone"]["license"] = "cc-by-4.0"  # as `ssl-em export --license` records it for the backbone
    meta_file.write_text(json.dumps(meta))
    assert main(["export-model", str(model), *args, "--out", str(tmp_path / "inherited")]) == 0
    assert yaml.safe_load((tmp_path / "inherited" / "bioimageio.yaml").read_text())["license"] == "CC-BY-4.0"

    meta["random_init"] = True  # the backbone's data never reached these weights: nothing to inherit
    meta_file.write_text(json.dumps(meta))
    assert main(["export-model", str(model), *args, "--out", str(tmp_path / "scratch")]) == 2
