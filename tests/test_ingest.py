"""ssl-em ingest: pixel-exact level 0, 2x-mean pyramid, curation and stats in the archive,
re-runs that skip, crash recovery, and bad sources that fail alone with a named error."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from ssl_em.data.archive import Archive, ArchiveWriter
from ssl_em.data.curation import Curator, curate
from ssl_em.data.ingest import _blocks, downsample2, image_name, ingest, pyramid_shapes
from ssl_em.data.readers import open_volume
from ssl_em.data.volume import ArrayVolume, VoxelSize


def _write_tif(path, data, voxel=None):
    import tifffile

    kw = {}
    if voxel:
        kw = dict(imagej=True, resolution=(1e3 / voxel[2], 1e3 / voxel[1]), metadata={"spacing": voxel[0] / 1e3, "unit": "um", "axes": "ZYX"})
    tifffile.imwrite(path, data, photometric="minisblack", **kw)
    return path


def _write_pngs(folder, data):
    from PIL import Image

    folder.mkdir()
    for z, plane in enumerate(data):
        Image.fromarray(plane).save(folder / f"{z}.png")
    return folder


def _mean2(a: np.ndarray, z_too: bool) -> np.ndarray:
    """Reference 2x mean for even shapes, by explicit slicing."""
    f = a.astype(np.float64)
    out = (f[:, 0::2, 0::2] + f[:, 1::2, 0::2] + f[:, 0::2, 1::2] + f[:, 1::2, 1::2]) / 4
    if z_too:
        out = (out[0::2] + out[1::2]) / 2
    return np.rint(out).astype(a.dtype)


@pytest.fixture(scope="module")
def em():
    from ssl_em.synthetic import make_volume

    return make_volume(shape=(8, 256, 256), seed=3).image


def test_round_trip_pyramid_curation_stats(tmp_path, em):
    aniso = _write_tif(tmp_path / "aniso.tif", em[:3], voxel=(40, 4, 4))
    iso = _write_tif(tmp_path / "iso stack!.tif", em, voxel=(8, 8, 8))
    summary = ingest([aniso, iso], tmp_path / "a.zarr", tile_size=128, progress=False)
    assert not summary.failed
    archive = Archive(tmp_path / "a.zarr")
    assert [im.name for im in archive.images] == ["aniso", "iso_stack"]

    a = archive["aniso"]
    assert a.meta["source_format"] == "tiff" and a.meta["complete"]
    assert [lv.shape for lv in a.levels] == [(3, 256, 256), (3, 128, 128), (3, 64, 64)]
    assert a.voxel_sizes == [VoxelSize(40, 4, 4), VoxelSize(40, 8, 8), VoxelSize(40, 16, 16)]
    assert a.levels[0].chunks == (1, 256, 256)
    np.testing.assert_array_equal(a.levels[0].read(), em[:3])
    np.testing.assert_array_equal(a.levels[1].read(), _mean2(em[:3], False))
    np.testing.assert_array_equal(a.levels[2].read(), _mean2(_mean2(em[:3], False), False))

    i = archive["iso_stack"]  # near-isotropic: z is halved too
    assert [lv.shape for lv in i.levels] == [(8, 256, 256), (4, 128, 128), (2, 64, 64)]
    assert i.voxel_sizes[1] == VoxelSize(16, 16, 16) and i.levels[0].chunks == (8, 128, 128)
    np.testing.assert_array_equal(i.levels[1].read(), _mean2(em, True))

    expected = curate(ArrayVolume(em[:3], (40, 4, 4)), Curator(tile_size=128))
    np.testing.assert_array_equal(a.curation, expected)
    assert a.meta["curation"]["counts"]["kept"] == int((expected == 0).sum()) == 12
    s = a.stats
    assert 0 <= s.lo < s.mean < s.hi <= 255 and abs(s.mean - em[:3].mean()) < 5


def test_odd_shapes_and_bounded_blocks(tmp_path, em):
    data = em[:2, :201, :255]
    path = _write_tif(tmp_path / "odd.tif", data)
    ingest([path], tmp_path / "a.zarr", tile_size=64, memory_mb=0, progress=False)  # smallest blocks
    im = Archive(tmp_path / "a.zarr")["odd"]
    assert [lv.shape for lv in im.levels] == [(2, 201, 255), (2, 101, 128)]
    np.testing.assert_array_equal(im.levels[0].read(), data)
    np.testing.assert_array_equal(im.levels[1].read(), downsample2(data, False))
    np.testing.assert_array_equal(downsample2(data, False)[:, :100, :127], _mean2(data[:, :200, :254], False))
    # The last row/column of an odd side is its own mean.
    np.testing.assert_array_equal(downsample2(data, False)[:, 100, :127], np.rint((data[:, 200, 0:254:2].astype(float) + data[:, 200, 1:254:2]) / 2))
    assert len(_blocks((2, 2048, 4096), (1, 256, 256), 256, 1, budget=0)) == 16  # rows split when planes are big
    assert pyramid_shapes((10, 512, 300), False) == [(10, 512, 300), (10, 256, 150), (10, 128, 75)]


def test_rerun_skips_crash_is_redone(tmp_path, em):
    src = _write_tif(tmp_path / "v.tif", em[:2])
    out = tmp_path / "a.zarr"
    assert ingest([src], out, progress=False).results[0].status == "ingested"
    assert ingest([src], out, progress=False).results[0].status == "skipped"

    # A crash: the image exists but "complete" was never written.
    writer = ArchiveWriter(out)
    meta = writer.status("v")
    writer.root["v"].attrs["ssl_em"] = {**meta, "complete": False}
    archive = Archive(out)
    assert archive.images == [] and archive.incomplete == ["v"]
    assert ingest([src], out, progress=False).results[0].status == "ingested"
    assert [im.name for im in Archive(out).images] == ["v"]

    os.utime(src, ns=(10**18, 10**18))  # the source changed: redo
    assert ingest([src], out, progress=False).results[0].status == "ingested"
    assert ingest([src], out, voxel_size=5, progress=False).results[0].status == "ingested"  # new voxel size: redo
    assert ingest([src], out, progress=False).results[0].status == "skipped"  # none given: keep what is there
    assert ingest([src], out, tile_size=64, progress=False).results[0].status == "ingested"  # new curation: redo


def _listed(archive: Path) -> list[str]:
    return json.loads((archive / "OME" / ".zattrs").read_text())["series"]


def test_listing_rereads_only_changed_images_and_waits_while_costly(tmp_path, em, monkeypatch):
    """Listing after every finished image would read every image again (quadratic in the
    image count): a writer reads an image's attributes only when they changed, and while a
    listing is costly, finished images wait for the next one or for close()."""
    for i in range(3):
        _write_tif(tmp_path / f"v{i}.tif", em[:1] + i)
    out = tmp_path / "a.zarr"
    ingest([tmp_path / f"v{i}.tif" for i in range(3)], out, progress=False)
    reads = []
    original = ArchiveWriter._entry
    monkeypatch.setattr(ArchiveWriter, "_entry", staticmethod(lambda p: reads.append(p.name) or original(p)))
    writer = ArchiveWriter(out)
    assert sorted(reads) == ["v0", "v1", "v2"] and _listed(out) == ["v0", "v1", "v2"]
    reads.clear()
    writer.write_listing()
    assert reads == []  # nothing changed: nothing read
    meta = writer.status("v1")
    writer.root["v1"].attrs["ssl_em"] = {**meta, "complete": False}  # v1 changed (a crash mid-redo)
    writer.write_listing()
    assert reads == ["v1"] and _listed(out) == ["v0", "v2"]

    writer._listing_cost = 3600.0  # as if listing were slow: finish() leaves it to close()
    writer.finish("v1", meta)
    assert _listed(out) == ["v0", "v2"] and Archive(out)["v1"]  # ssl_em's reader sees it already
    writer.close()
    assert _listed(out) == ["v0", "v1", "v2"]


def test_bad_sources_fail_alone(tmp_path, em, capsys):
    from ssl_em import cli

    good = _write_pngs(tmp_path / "good", em[:2])
    trunc = _write_pngs(tmp_path / "trunc", em[:2])
    data = (trunc / "1.png").read_bytes()
    (trunc / "1.png").write_bytes(data[: len(data) // 3])
    garbage = tmp_path / "garbage.tif"
    garbage.write_bytes(os.urandom(2000))
    empty = tmp_path / "empty"
    empty.mkdir()
    constant = _write_tif(tmp_path / "constant.tif", np.full((2, 64, 64), 7, np.uint8))

    bad = [trunc, garbage, empty, constant]
    code = cli.main(["ingest", str(good), *map(str, bad), "--out", str(tmp_path / "a.zarr"), "--quiet", "--tile-size", "128"])
    assert code == 2
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    expected = [f"{trunc / '1.png'}: unreadable or truncated image", f"{garbage}: not a readable TIFF", f"{empty}: folder holds no images",
                f"{constant}: constant volume"]
    assert len(err) == len(expected)  # each failure said once
    for line, start in zip(err, expected):
        assert line.startswith(f"ssl-em ingest: error: {start}"), line
    assert "4 failed" in captured.out and "unreadable" not in captured.out  # listed, not repeated
    archive = Archive(tmp_path / "a.zarr")
    assert [im.name for im in archive.images] == ["good"] and archive.incomplete == []
    np.testing.assert_array_equal(archive["good"].levels[0].read(), em[:2])


def test_folder_of_images_of_different_sizes_is_a_set_of_2d_images(tmp_path, em, capsys):
    """CEM500K-style patches: one archive image per file, and a note that says so."""
    from PIL import Image

    folder = _write_pngs(tmp_path / "patches", em[:2])
    Image.fromarray(em[2, :100, :80]).save(folder / "2.png")
    summary = ingest([folder], tmp_path / "a.zarr", progress=False, tile_size=64)
    assert not summary.failed
    assert [r.name for r in summary.results] == ["patches-0", "patches-1", "patches-2"]
    assert [r.shape for r in summary.results] == [(1, 256, 256), (1, 256, 256), (1, 100, 80)]
    np.testing.assert_array_equal(Archive(tmp_path / "a.zarr")["patches-2"].levels[0].read()[0], em[2, :100, :80])
    assert "differ in size (100x80, 256x256); each is ingested as its own 2D image" in capsys.readouterr().err
    same = _write_pngs(tmp_path / "stack", em[:3])  # one size: still one z-stack
    assert [r.shape for r in ingest([same], tmp_path / "a.zarr", progress=False, tile_size=64).results] == [(3, 256, 256)]


def test_names_are_sanitised_and_unique(tmp_path, em):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    a = _write_tif(tmp_path / "x" / "scan 1.tif", em[:1])
    b = _write_tif(tmp_path / "y" / "scan 1.tif", em[1:2])
    summary = ingest([a, b], tmp_path / "a.zarr", progress=False)
    assert [r.name for r in summary.results] == ["scan_1", "scan_1-2"]
    assert [r.status for r in ingest([b, a], tmp_path / "a.zarr", progress=False).results] == ["skipped", "skipped"]
    assert image_name("/data/train-image.h5:/volumes/raw") == "train-image-volumes-raw"


@pytest.mark.realdata
def test_real_sources_round_trip_and_inspect(tmp_path, shared_data, capsys):
    from ssl_em import cli

    isbi = tmp_path / "isbi_first3"
    isbi.mkdir()
    for z in range(3):  # a few real slices, linked not copied
        (isbi / f"{z}.png").symlink_to(shared_data / "isbi2012" / "test" / f"{z}.png")
    sources = [str(isbi), f"{shared_data}/gala_fibsem/train-image.h5", f"{shared_data}/bioimageio_crops/em2d_512__zenodo5817052.tif"]
    out = tmp_path / "real.zarr"
    # Two runs into one archive; the voxel size given fits the ssTEM sources, not the FIB-SEM one.
    assert cli.main(["ingest", sources[0], sources[2], "--out", str(out), "--voxel-size", "50,4,4", "--quiet"]) == 0
    assert cli.main(["ingest", *sources, "--out", str(out), "--quiet"]) == 0  # the first two are skipped
    archive = Archive(out)
    assert [im.name for im in archive.images] == ["em2d_512__zenodo5817052", "isbi_first3", "train-image"]
    for spec, im in zip(sources, [archive["isbi_first3"], archive["train-image"], archive["em2d_512__zenodo5817052"]]):
        np.testing.assert_array_equal(im.levels[0].read(), open_volume(spec).read())
        counts = im.meta["curation"]["counts"]
        assert counts["kept"] >= 0.9 * counts["total"], counts
        assert im.meta["voxel_size_known"] == (im.name != "train-image")

    assert cli.main(["inspect", str(out), "--sheet", str(tmp_path / "sheet.png"), "--n", "8"]) == 0
    printed = capsys.readouterr().out
    assert "isbi_first3" in printed and "contact sheet" in printed
    from PIL import Image

    assert Image.open(tmp_path / "sheet.png").size[0] > 0


def test_two_shards_make_the_archive_one_process_makes(tmp_path, em):
    """`--shard 0/2` and `--shard 1/2` running at once into one archive equal one process,
    image by image (names, every level, curation flags, metadata); same-named sources in
    two folders get the same names in both cases."""
    import subprocess
    import sys

    for d in ("x", "y"):
        (tmp_path / d).mkdir()
    sources = [str(_write_tif(tmp_path / "x" / "scan.tif", em[:2])), str(_write_tif(tmp_path / "y" / "scan.tif", em[2:4])),
               str(_write_tif(tmp_path / "other.tif", em[4:7])), str(_write_tif(tmp_path / "x" / "last.tif", em[7:]))]
    one = tmp_path / "one.zarr"
    ingest(sources, one, tile_size=128, progress=False)
    two = tmp_path / "two.zarr"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "ssl_em.cli", "ingest", *sources, "--out", str(two), "--quiet", "--tile-size", "128", "--shard", f"{i}/2"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        errs = [p.communicate(timeout=300)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], errs
    a, b = Archive(one), Archive(two)
    assert [im.name for im in a.images] == [im.name for im in b.images] == ["last", "other", "scan", "scan-2"]
    assert b.incomplete == []
    for x, y in zip(a.images, b.images):
        assert x.meta == y.meta, x.name
        assert len(x.levels) == len(y.levels)
        for lx, ly in zip(x.levels, y.levels):
            np.testing.assert_array_equal(lx.read(), ly.read())
        np.testing.assert_array_equal(x.curation, y.curation)
    assert a.fingerprint == b.fingerprint


def test_shard_is_checked():
    from ssl_em.data.ingest import parse_shard

    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "-1/2", "x", "1/2/3"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)


def test_disk_full_names_the_archive_file_not_the_source(tmp_path, capsys, monkeypatch):
    """ENOSPC while writing the archive was reported as "SOURCE: [Errno 28] ...", blaming
    the source; it names the file being written."""
    import errno

    import tifffile

    import ssl_em.data.ingest as ing

    src = tmp_path / "em.tif"
    tifffile.imwrite(src, np.random.default_rng(0).integers(0, 255, (2, 64, 64), dtype=np.uint8), photometric="minisblack")
    chunk = tmp_path / "a.zarr" / "em" / "0" / "0.0.0"

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(chunk))

    monkeypatch.setattr(ing, "_ingest_one", full)
    summary = ingest([src], tmp_path / "a.zarr", progress=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"ssl-em ingest: error: {chunk}: no space left on device"), err
    assert summary.failed
