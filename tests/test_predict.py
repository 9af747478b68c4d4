"""Sliding-window prediction: blending matches a whole-image forward, memory stays within a
slab, resume skips finished slabs, another prediction is never overwritten silently,
orthogonal planes, and instance post-processing recovers synthetic cells."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from ssl_em.data.normalize import IntensityStats, Normalization, normalize_numpy
from ssl_em.data.volume import ArrayVolume
from ssl_em.inference.instance import foreground_boundary, instance_targets, segment_slices, watershed_instances
from ssl_em.inference.metrics import instance_scores
from ssl_em.inference.predict import predict_volume
from ssl_em.inference.store import PredictSettings, PredictionExistsError, read_probabilities
from ssl_em.inference.window import blend_weights, predict_plane
from ssl_em.ngff import encode_probabilities

CLASSES = ["a", "b", "c"]
NORM = Normalization()


# One intra-op thread for this module (fixture in conftest.py).


def local_net(kernel: int, seed: int = 0) -> nn.Module:
    """A purely local model (receptive field `kernel` px per conv) standing in for a network."""
    torch.manual_seed(seed)
    pad = kernel // 2
    return nn.Sequential(nn.Conv2d(1, 4, kernel, padding=pad), nn.Tanh(), nn.Conv2d(4, 3, kernel, padding=pad)).eval()


class RecordingVolume(ArrayVolume):
    """Counts the largest region any read asked for."""

    max_read = 0

    def _read(self, zs, ys, xs):
        out = super()._read(zs, ys, xs)
        RecordingVolume.max_read = max(RecordingVolume.max_read, out.size)
        return out


class CountingNet(nn.Module):
    def __init__(self, net, fail_after: int | None = None):
        super().__init__()
        self.net, self.calls, self.fail_after = net, 0, fail_after

    def forward(self, x):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("simulated crash")
        return self.net(x)


@pytest.fixture(scope="module")
def volume():
    rng = np.random.default_rng(0)
    return (rng.random((5, 70, 90)) * 200).astype(np.uint8)


def test_pointwise_blend_is_exact():
    net = nn.Conv2d(1, 3, 1).eval()
    img = np.random.default_rng(1).standard_normal((70, 90)).astype(np.float32)
    got = predict_plane(net, img, window=32, overlap=8, batch_size=5)
    with torch.no_grad():
        want = net(torch.from_numpy(img)[None, None]).softmax(1)[0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_blend_matches_whole_image_forward_in_the_interior():
    net = local_net(3)
    img = np.random.default_rng(2).standard_normal((100, 120)).astype(np.float32)
    got = predict_plane(net, img, window=48, overlap=16, batch_size=4)
    with torch.no_grad():
        want = net(torch.from_numpy(img)[None, None]).softmax(1)[0].numpy()
    err = np.abs(got - want)[:, 2:-2, 2:-2]
    # only pixels within 2 px of a window edge differ, and there the ramp weight is tiny
    assert err.max() < 0.02 and err.mean() < 1e-3
    w = blend_weights(48, 16)
    assert w.min() > 0 and w[24, 24] == 1


def test_small_image_is_padded():
    net = nn.Conv2d(1, 3, 1).eval()
    out = predict_plane(net, np.zeros((10, 20), np.float32), window=32, overlap=8)
    assert out.shape == (3, 10, 20)


def _settings(**kw):
    return PredictSettings(**{"window": 32, "overlap": 8, "slab": 2, "batch_size": 4} | kw)


def test_volume_prediction_memory_resume_and_refusal(volume, tmp_path):
    import zarr

    net = local_net(1)  # pointwise: whole-volume reference is exact
    stats = IntensityStats.compute(volume)
    vol = RecordingVolume(volume)
    RecordingVolume.max_read = 0
    out = tmp_path / "p.zarr"
    predict_volume(net, vol, out, CLASSES, NORM, _settings(), model_id="m1", stats=stats, progress=False)
    assert RecordingVolume.max_read <= 2 * 70 * 90  # one slab, never the volume
    root = zarr.open_group(str(out), mode="r")
    with torch.no_grad():
        want = net(torch.from_numpy(normalize_numpy(volume, stats, NORM))[:, None]).softmax(1).permute(1, 0, 2, 3).numpy()
    assert root["0"].dtype == np.uint8
    np.testing.assert_allclose(read_probabilities(root["0"]), want, atol=0.5 / 255 + 1e-6)
    np.testing.assert_array_equal(root["labels/semantic/0"][:], want.argmax(0) + 1)  # 0 is left for "not predicted"
    attrs = json.loads((out / ".zattrs").read_text())
    assert attrs["ssl_em"]["complete"] and attrs["multiscales"][0]["axes"][0]["name"] == "c"
    assert json.loads((out / "labels" / ".zattrs").read_text())["labels"] == ["semantic"]
    assert "image-label" in json.loads((out / "labels" / "semantic" / ".zattrs").read_text())

    # crash after the first slab: 70 x 90 needs 3 x 4 windows = 3 batches of 4 per plane; slab 0 = 2 planes = 6 calls
    out2 = tmp_path / "crash.zarr"
    crashing = CountingNet(net, fail_after=6)
    with pytest.raises(RuntimeError, match="simulated crash"):
        predict_volume(crashing, ArrayVolume(volume), out2, CLASSES, NORM, _settings(), model_id="m1", stats=stats, progress=False)
    assert sorted(p.name for p in (out2 / ".progress" / "xy").iterdir()) == ["0"]
    resumed = CountingNet(net)
    predict_volume(resumed, ArrayVolume(volume), out2, CLASSES, NORM, _settings(), model_id="m1", stats=stats, progress=False)
    assert resumed.calls == 3 * 3  # planes 2..4 only: slab 0 was skipped
    np.testing.assert_array_equal(zarr.open_group(str(out2), mode="r")["0"][:], root["0"][:])

    # another model into the same OUT: refused, nothing touched; --overwrite replaces it
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    with pytest.raises(PredictionExistsError, match="different model"):
        predict_volume(net, ArrayVolume(volume), out, CLASSES, NORM, _settings(), model_id="m2", stats=stats, progress=False)
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    predict_volume(net, ArrayVolume(volume), out, CLASSES, NORM, _settings(), model_id="m2", stats=stats, overwrite=True, progress=False)
    assert json.loads((out / ".zattrs").read_text())["ssl_em"]["identity"]["model"] == "m2"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(PredictionExistsError, match="not an ssl_em prediction"):
        predict_volume(net, ArrayVolume(volume), tmp_path / "other", CLASSES, NORM, _settings(), model_id="m1", stats=stats, progress=False)


def test_orthogonal_planes_average(volume, tmp_path):
    import zarr

    net = local_net(1)  # pointwise: every plane gives the same probabilities
    stats = IntensityStats.compute(volume)
    small = volume[:, :40, :36]
    predict_volume(net, ArrayVolume(small), tmp_path / "xy.zarr", CLASSES, NORM, _settings(), model_id="m", stats=stats, progress=False)
    predict_volume(net, ArrayVolume(small), tmp_path / "all.zarr", CLASSES, NORM, _settings(planes=("xy", "xz", "yz")), model_id="m", stats=stats, progress=False)
    a = read_probabilities(zarr.open_group(str(tmp_path / "xy.zarr"), mode="r")["0"])
    b = read_probabilities(zarr.open_group(str(tmp_path / "all.zarr"), mode="r")["0"])
    np.testing.assert_allclose(a, b, atol=1 / 255 + 1e-6)  # each plane and their mean rounded to 1/255


@pytest.fixture(scope="module")
def cells():
    from ssl_em.synthetic import make_volume

    return make_volume(shape=(4, 96, 96), seed=3).cells


def _probs_from_ids(ids: np.ndarray, noise: float, seed: int = 0) -> np.ndarray:
    """Class probabilities a good network would give: one-hot targets, blurred and noisy."""
    from scipy import ndimage

    t = np.stack([instance_targets(s) for s in ids])
    p = np.stack([(t == k).astype(np.float32) for k in range(3)])
    p = ndimage.gaussian_filter(p, (0, 0, 1, 1)) + noise * np.random.default_rng(seed).random(p.shape)
    return p / p.sum(0, keepdims=True)


def test_watershed_recovers_synthetic_cells(cells):
    fg, bd = foreground_boundary(_probs_from_ids(cells, noise=0.2))
    seg2d = segment_slices(fg, bd, min_size=10)
    scores = [instance_scores(seg2d[z], cells[z]) for z in range(cells.shape[0])]
    assert np.mean([s["voi"] for s in scores]) < 0.3
    assert np.mean([s["adapted_rand_error"] for s in scores]) < 0.05
    assert np.mean([s["ap50"] for s in scores]) > 0.9
    seg3d = watershed_instances(fg, bd, min_size=10)  # 3D: one id per cell through z
    assert instance_scores(seg3d, cells)["voi"] < 0.5


def test_small_fragments_are_merged_or_removed():
    fg = np.ones((20, 20), np.float32)
    bd = np.zeros((20, 20), np.float32)
    bd[:, 10] = 1.0  # a wall splits two cells
    fg[:, 10] = 1.0
    interior = np.zeros((20, 20), bool)
    interior[2:18, 1:9] = interior[2:18, 12:19] = True
    interior[0, 19] = True  # a 1-pixel seed: a fragment to merge away
    ids = watershed_instances(np.where(interior, 1.0, 0.6), np.where(interior, 0.0, 0.3), seed_threshold=0.5, min_size=5)
    assert len(np.unique(ids[ids > 0])) == 2
    kept = watershed_instances(np.where(interior, 1.0, 0.6), np.where(interior, 0.0, 0.3), min_size=5, merge_small=False)
    assert kept[0, 19] == 0


def test_plane_merges_join_continuing_segments_not_slivers():
    from ssl_em.inference.instance import merge_map, plane_merges, relabel

    a = np.zeros((10, 10), np.uint32)
    b = np.zeros((10, 10), np.uint32)
    a[:, :5], a[:, 5:] = 1, 2  # two cells meet at x = 5
    b[:, :5], b[:, 5:] = 7, 8  # the same cells on the other side of the boundary
    b[:, 4] = 8  # cell 8 reaches one column into cell 1's side: a sliver, not a majority
    assert plane_merges(a, b) == [(1, 7), (2, 8)]
    assert plane_merges(a, np.zeros_like(b)) == []
    mapping = merge_map([(1, 7), (2, 8), (8, 9)])
    assert mapping == {7: 1, 8: 2, 9: 2}
    ids = np.array([[1, 7, 8, 9, 0, 5]], np.uint32)
    once = relabel(ids, mapping)
    np.testing.assert_array_equal(once, [[1, 1, 2, 2, 0, 5]])
    np.testing.assert_array_equal(relabel(once, mapping), once)  # idempotent: resumable


def _instances_3d_of(probs, shape, block, path, monkeypatch=None):
    from ssl_em.inference.instance import INSTANCE_CLASSES
    from ssl_em.inference.predict import _instances_3d
    from ssl_em.inference.store import Prediction

    s = PredictSettings(window=32, overlap=8, slab=4, instances="3d", min_size=10, block=block, halo=4)
    pred = Prediction(path, {"block": list(block)}, shape, list(INSTANCE_CLASSES), s)
    pred.array("0")[:] = encode_probabilities(probs)
    _instances_3d(pred, s, progress=False)
    return pred.array("labels/instances/0")[:], pred


def test_blockwise_3d_instances_match_the_whole_volume(tmp_path, monkeypatch):
    """27 blocks of 4 x 40 x 40 (halo 4) score like one watershed over the whole volume,
    because cells cut by block boundaries are joined again."""
    import ssl_em.inference.predict as predict_module
    from ssl_em.synthetic import make_volume

    cells = make_volume(shape=(12, 96, 96), seed=3).cells
    probs = _probs_from_ids(cells, noise=0.2)
    whole, _ = _instances_3d_of(probs, cells.shape, (12, 96, 96), tmp_path / "whole.zarr")
    blocks, pred = _instances_3d_of(probs, cells.shape, (4, 40, 40), tmp_path / "blocks.zarr")
    s_whole, s_blocks = instance_scores(whole, cells), instance_scores(blocks, cells)
    assert s_whole["voi"] < 0.6
    assert s_blocks["voi"] < s_whole["voi"] + 0.15 and s_blocks["adapted_rand_error"] < s_whole["adapted_rand_error"] + 0.05
    assert json.loads((pred.progress / "instance_merges.json").read_text())  # there were cuts to join
    monkeypatch.setattr(predict_module, "merge_map", lambda pairs: {})  # the same blocks, never joined
    unjoined, _ = _instances_3d_of(probs, cells.shape, (4, 40, 40), tmp_path / "unjoined.zarr")
    assert instance_scores(unjoined, cells)["voi_split"] > s_blocks["voi_split"] + 1.0


def test_default_planes_follow_the_voxel_size(volume):
    from ssl_em.data.volume import VoxelSize
    from ssl_em.inference.predict import default_planes

    assert default_planes(ArrayVolume(volume, VoxelSize(8, 8, 8))) == ("xy", "xz", "yz")  # FIB-SEM
    assert default_planes(ArrayVolume(volume, VoxelSize(9, 8, 8))) == ("xy", "xz", "yz")
    assert default_planes(ArrayVolume(volume, VoxelSize(50, 4, 4))) == ("xy",)  # serial sections
    assert default_planes(ArrayVolume(volume)) == ("xy",)  # unknown voxel size
    assert default_planes(ArrayVolume(volume[:1], VoxelSize(8, 8, 8))) == ("xy",)  # one slice


def test_cli_prints_its_precision_once_and_the_flag_overrides(tmp_path, capsys):
    import tifffile

    from ssl_em.cli import main
    from ssl_em.finetune.module import SegmentationModule
    from ssl_em.precision import choose

    SegmentationModule("test_resnet", num_classes=2, tile_size=32).export(tmp_path / "m", 32)
    tifffile.imwrite(tmp_path / "v.tif", (np.random.default_rng(0).random((2, 40, 40)) * 255).astype(np.uint8))
    for flag, said in (([], choose("cpu").why), (["--precision", "32-true"], "32-true, contiguous: as requested")):
        argv = ["predict", str(tmp_path / "m"), str(tmp_path / "v.tif"), "--out", str(tmp_path / f"p{len(flag)}.zarr"), "--no-progress", "--accelerator", "cpu", *flag]
        assert main(argv) == 0
        assert [line for line in capsys.readouterr().out.splitlines() if line.startswith("ssl-em predict: precision")] == [f"ssl-em predict: precision {said}"]


def test_overwrite_replaces_an_earlier_prediction_only(tmp_path):
    """--overwrite may replace a store marked as an ssl_em prediction (even one cut short
    before its attributes were complete), and nothing else."""
    import zarr

    from ssl_em.inference.store import FORMAT, Prediction, PredictionExistsError

    ours = tmp_path / "cut.zarr"
    zarr.open_group(str(ours), mode="w", zarr_format=2).attrs["ssl_em"] = {"format": FORMAT, "identity": None, "complete": False}
    assert Prediction.check(ours, {"model": "m"}, overwrite=True)
    foreign = tmp_path / "other.zarr"
    zarr.open_group(str(foreign), mode="w", zarr_format=2).attrs["ssl_em"] = {"source": "x.tif", "complete": True}  # an archive image
    with pytest.raises(PredictionExistsError, match="not an ssl_em prediction"):
        Prediction.check(foreign, {"model": "m"}, overwrite=True)
    assert (foreign / ".zattrs").is_file()


def test_deleted_labels_are_noticed_and_unknown_voxel_size_has_no_unit(tmp_path, volume, capsys):
    """A finished prediction whose labels/ group was deleted is not reported done; a volume
    without a voxel size gets a scale of 1 and no unit, not a fake 1 nm."""
    import shutil

    from ssl_em.data.volume import VoxelSize

    net, stats, out = local_net(3), IntensityStats.compute(volume), tmp_path / "p.zarr"
    predict_volume(net, ArrayVolume(volume), out, CLASSES, NORM, _settings(), model_id="m1", stats=stats, progress=False)
    for f in (".zattrs", "labels/semantic/.zattrs"):
        axes = json.loads((out / f).read_text())["multiscales"][0]["axes"]
        assert [a.get("unit") for a in axes if a["type"] == "space"] == [None] * 3, f
    shutil.rmtree(out / "labels")
    with pytest.raises(PredictionExistsError, match="labels/semantic/0 is missing"):
        predict_volume(net, ArrayVolume(volume), out, CLASSES, NORM, _settings(), model_id="m1", stats=stats, progress=False)
    predict_volume(net, ArrayVolume(volume), out, CLASSES, NORM, _settings(), model_id="m1", stats=stats, overwrite=True, progress=False)
    assert (out / "labels" / "semantic" / "0" / ".zarray").is_file()
    known = tmp_path / "known.zarr"
    predict_volume(net, ArrayVolume(volume, voxel_size=VoxelSize(30.0, 4.0, 4.0)), known, CLASSES, NORM, _settings(), model_id="m1", stats=stats, progress=False)
    ms = json.loads((known / ".zattrs").read_text())["multiscales"][0]
    assert [a.get("unit") for a in ms["axes"]] == [None, "nanometer", "nanometer", "nanometer"]
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, 30.0, 4.0, 4.0]
