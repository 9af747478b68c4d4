"""`ssl-em measure`: per-object sizes in nanometres, checked against values computed by hand."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from ssl_em.measure import measure, measure_objects, summarize

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _rect_2d() -> np.ndarray:
    a = np.zeros((8, 9), np.int32)
    a[2:5, 3:7] = 1  # 3 rows x 4 columns, inside
    a[6:8, 0:2] = 2  # 2 x 2, in the bottom-left corner: touches the border
    return a


def test_rectangle_at_2_nm_pixels():
    """3 x 4 px at 2 nm: area 12 px x 4 nm^2 = 48 nm^2; skimage's perimeter runs through the
    border pixels' centres, 2 (2 + 3) px = 10 px = 20 nm; the bbox is 6 x 8 nm; the centroid is
    at row 3, column 4.5 (6, 9 nm). Inertia: a run of n pixels has variance (n^2 - 1) / 12, so the
    axes are 4 sqrt(15/12) and 4 sqrt(8/12) px and the elongation sqrt(15/8)."""
    t = measure_objects(_rect_2d(), (2.0, 2.0), intensity=np.where(_rect_2d() == 1, 7.0, 1.0))
    assert t["object"].tolist() == [1, 2]
    assert t["size"][0] == 48.0 and t["surface"][0] == pytest.approx(20.0)
    assert (t["extent_y_nm"][0], t["extent_x_nm"][0]) == (6.0, 8.0)
    assert (t["centroid_y_nm"][0], t["centroid_x_nm"][0]) == (6.0, 9.0)
    assert t["equivalent_diameter_nm"][0] == pytest.approx(math.sqrt(4 * 48 / math.pi))
    assert t["elongation"][0] == pytest.approx(math.sqrt(15 / 8))
    assert t["mean_intensity"].tolist() == [7.0, 1.0]
    assert t["touches_border"].tolist() == [False, True]
    assert t["size"][1] == 16.0 and t["extent_y_nm"][1] == 4.0


def test_anisotropic_pixels_use_the_marching_squares_contour():
    """skimage's perimeter refuses non-square pixels; the contour at 0.5 around the 3 x 4
    rectangle has 3 px horizontal runs (x 2 nm), 2 px vertical runs (x 1 nm) and four corner
    cuts of (0.5 px, 0.5 px) = (0.5 nm, 1 nm)."""
    a = (_rect_2d() == 1).astype(np.int32)
    t = measure_objects(a, (1.0, 2.0))
    assert t["size"][0] == 24.0
    assert t["surface"][0] == pytest.approx(2 * 3 * 2 + 2 * 2 * 1 + 4 * math.hypot(0.5, 1.0))


def test_box_volume_and_marching_cubes_surface():
    """A 2 x 3 x 4 voxel box. Volume at 5 x 2 x 2 nm: 24 x 20 = 480 nm^3. Its marching-cubes
    surface (unit voxels) is the box through the outer voxels' centres, grown by half a voxel
    with bevelled edges and corners: flat faces 2 (1*2 + 2*3 + 1*3), edge strips of width
    sqrt(2)/2 along 4 (1 + 2 + 3) of length, and 8 corner triangles of side sqrt(2)/2 (area
    sqrt(3)/8 each); at 2 nm isotropic voxels every area is 4 times that."""
    box = np.zeros((4, 6, 7), np.int32)
    box[1:3, 1:4, 2:6] = 1
    t = measure_objects(box, (5.0, 2.0, 2.0))
    assert t["size"][0] == 480.0
    assert (t["extent_z_nm"][0], t["extent_y_nm"][0], t["extent_x_nm"][0]) == (10.0, 6.0, 8.0)
    assert (t["centroid_z_nm"][0], t["centroid_y_nm"][0], t["centroid_x_nm"][0]) == (7.5, 4.0, 7.0)
    unit = 2 * (1 * 2 + 2 * 3 + 1 * 3) + 4 * (1 + 2 + 3) * math.sqrt(2) / 2 + 8 * math.sqrt(3) / 8
    assert measure_objects(box, (2.0, 2.0, 2.0))["surface"][0] == pytest.approx(4 * unit, rel=1e-5)
    assert not t["touches_border"][0]


def test_classes_split_into_connected_components_in_3d_and_2d():
    """Class value 1: two blobs; one of them spans two slices. Class 2 touches them. In 3D the
    first blob is one object; slice by slice it is two; the values of other classes never join."""
    lab = np.zeros((3, 10, 10), np.uint8)
    lab[0:2, 1:3, 1:3] = 1  # 2 slices x 2 x 2
    lab[1, 6:9, 6:9] = 1  # 3 x 3 in one slice
    lab[0:2, 3:5, 1:3] = 2  # touching the first blob, another class
    rows = measure(lab, (10.0, 2.0, 2.0), {1: "mito", 2: "er"})
    mito = [r for r in rows if r["class"] == "mito"]
    assert sorted(r["volume_nm3"] for r in mito) == [8 * 40.0, 9 * 40.0]
    assert [r["volume_nm3"] for r in rows if r["class"] == "er"] == [8 * 40.0]
    assert all(r["mean_intensity"] is None for r in rows)
    flat = measure(lab, (10.0, 2.0, 2.0), {1: "mito", 2: "er"}, mode="2d", select=["mito"])
    assert sorted((r["z"], r["area_nm2"]) for r in flat) == [(0, 16.0), (1, 16.0), (1, 36.0)]
    assert {r["centroid_z_nm"] for r in flat} == {0.0, 10.0}
    summary = summarize(rows)
    assert summary[0] == {"class": "mito", "count": 2, "mean_volume_nm3": 340.0, "median_volume_nm3": 340.0,
                          "mean_equivalent_diameter_nm": pytest.approx(np.mean([(6 * v / math.pi) ** (1 / 3) for v in (320, 360)])),
                          "touching_border": 1}  # the first blob starts in slice 0: cut by the volume's face


def test_instances_are_measured_as_they_are():
    """Instance ids are objects whatever touches them: two touching instances stay two."""
    ids = np.zeros((1, 6, 6), np.uint32)
    ids[0, 1:3, 1:3], ids[0, 3:5, 1:3] = 5, 9
    rows = measure(ids, (1.0, 3.0, 3.0), None, mode="2d")
    assert [(r["class"], r["object"], r["area_nm2"]) for r in rows] == [("instance", 5, 36.0), ("instance", 9, 36.0)]


# -- the command line ---------------------------------------------------------------------------


def _read(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _tif(path: Path, array: np.ndarray, **kw) -> Path:
    import tifffile

    tifffile.imwrite(path, array, photometric="minisblack", **kw)
    return path


def test_cli_on_a_label_volume(tmp_path, capsys):
    from ssl_em.cli import main

    lab = np.zeros((2, 8, 9), np.uint8)
    lab[0] = _rect_2d() == 1
    img = np.where(lab == 1, 200, 10).astype(np.uint8)
    _tif(tmp_path / "lab.tif", lab)
    _tif(tmp_path / "img.tif", img)
    out = tmp_path / "objects.csv"
    assert main(["measure", str(tmp_path / "lab.tif"), "--out", str(out), "--2d", "--voxel-size", "30,2,2", "--image", str(tmp_path / "img.tif")]) == 0
    (row,) = _read(out)
    assert (row["class"], row["z"], float(row["area_nm2"]), float(row["perimeter_nm"]), float(row["mean_intensity"])) == ("1", "0", 48.0, 20.0, 200.0)
    assert row["touches_border"] == "False"
    (summary,) = _read(tmp_path / "objects_summary.csv")
    assert summary["count"] == "1" and float(summary["mean_area_nm2"]) == 48.0
    printed = capsys.readouterr().out
    assert "count 1" in printed and "objects_summary.csv" in printed


@pytest.fixture(scope="module")
def prediction(tmp_path_factory):
    """An `ssl-em predict` output of an untrained tiny model, at 30 x 4 x 4 nm."""
    from test_bad_input import tiny_models

    from ssl_em.cli import main
    from ssl_em.synthetic import make_volume

    tmp = tmp_path_factory.mktemp("measure")
    tiny_models(tmp / "backbone", tmp / "model")
    image = _tif(tmp / "em.tif", make_volume(shape=(3, 48, 48), seed=0).image)
    assert main(["predict", str(tmp / "model"), str(image), "--out", str(tmp / "pred.zarr"), "--no-progress", "--accelerator", "cpu", "--voxel-size", "30,4,4"]) == 0
    return tmp / "pred.zarr", image


def test_cli_on_a_prediction_reads_its_classes_scale_and_image(prediction, tmp_path):
    """The CSV equals `measure` on the stored labels (class + 1) with the prediction's voxel
    size, and the raw image it recorded gives mean_intensity."""
    import tifffile
    import zarr

    from ssl_em.cli import main

    pred, image = prediction
    out = tmp_path / "o.csv"
    assert main(["measure", str(pred), "--out", str(out)]) == 0
    got = _read(out)
    stored = zarr.open_group(str(pred), mode="r")["labels/semantic/0"][:]
    want = measure(stored, (30.0, 4.0, 4.0), {1: "dark", 2: "bright"}, tifffile.imread(image))
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        assert g["class"] == w["class"] and float(g["volume_nm3"]) == pytest.approx(w["volume_nm3"])
        assert float(g["mean_intensity"]) == pytest.approx(w["mean_intensity"])
    assert {g["class"] for g in got} <= {"dark", "bright"}


@pytest.mark.parametrize("argv, needle", [
    (lambda p, t: [str(t / "nope.zarr"), "--out", str(t / "o.csv")], "nope.zarr"),
    (lambda p, t: [str(p), "--out", str(t / "o.csv"), "--classes", "mito"], "'mito'"),
    (lambda p, t: [str(p), "--out", str(t / "o.csv"), "--instances"], "labels/instances"),
    (lambda p, t: [str(p), "--out", str(t / "o.csv"), "--image", str(t / "small.tif")], "shape"),
    (lambda p, t: [str(p), "--out", str(t / "missing" / "o.csv")], "--out"),
    (lambda p, t: [str(t / "float.tif"), "--out", str(t / "o.csv")], "integers"),
])
def test_bad_input_is_one_line_and_exit_2(prediction, tmp_path, capsys, argv, needle):
    from ssl_em.cli import main

    _tif(tmp_path / "small.tif", np.zeros((3, 8, 8), np.uint8))
    _tif(tmp_path / "float.tif", np.zeros((3, 8, 8), np.float32))
    assert main(["measure", *argv(prediction[0], tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ssl-em measure: error:") and needle in err and "\n" not in err
    assert not (tmp_path / "o.csv").exists()


def test_object_table_numbers_objects_across_classes():
    """One id volume for every class (ids unique across classes), a table row per id."""
    from ssl_em.measure import object_table

    lab = np.zeros((2, 8, 8), np.uint8)
    lab[:, 0:2, 0:2] = 1
    lab[:, 5:7, 5:7] = 1
    lab[:, 3, :] = 2
    ids, table = object_table(lab, (10.0, 2.0, 2.0), {1: "mito", 2: "er"}, intensity=lab.astype(float) * 3)
    assert sorted(np.unique(ids).tolist()) == [0, 1, 2, 3] and list(table["index"]) == [1, 2, 3]
    assert list(table["class"]) == ["mito", "mito", "er"]
    assert table["volume_nm3"].tolist() == [8 * 40.0, 8 * 40.0, 16 * 40.0]
    assert table["mean_intensity"].tolist() == [3.0, 3.0, 6.0]
    assert (ids[lab == 2] == 3).all()
    flat_ids, flat = object_table(lab[:1], (10.0, 2.0, 2.0), {1: "mito"})
    assert flat["area_nm2"].tolist() == [16.0, 16.0] and "perimeter_nm" in flat and flat_ids.shape == (1, 8, 8)
