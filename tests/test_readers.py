"""open_volume over every format: shape, dtype, voxel size (from metadata or given), lazy
region reads, pickling, and one-line VolumeErrors that start with the file's path."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from ssl_em.data.readers import detect_format, open_volume, source_fingerprint
from ssl_em.data.volume import VolumeError, VoxelSize

REGION = (slice(1, 3), slice(5, 40), slice(7, 50))


@pytest.fixture(scope="module")
def vol():
    """A small synthetic EM volume (4, 48, 64) uint8."""
    from ssl_em.synthetic import make_volume

    return make_volume(shape=(4, 48, 64), seed=1).image


def _check(v, expected: np.ndarray, voxel=None):
    assert v.shape == expected.shape
    assert v.dtype == expected.dtype
    np.testing.assert_array_equal(v.read(*REGION), expected[REGION])
    np.testing.assert_array_equal(v[:], expected)
    if voxel is not None:
        assert v.voxel_size_known
        np.testing.assert_allclose(v.voxel_size.as_tuple(), voxel, rtol=1e-6)


# -- chunked stores ---------------------------------------------------------------------
def test_ome_zarr_voxel_size_from_ngff(tmp_path, vol):
    import zarr

    from ssl_em.data.archive import ngff_multiscales

    g = zarr.open_group(str(tmp_path / "img.ome.zarr"), mode="w", zarr_format=2)
    g.create_array("0", data=vol, chunks=(1, 32, 32))
    g.create_array("1", data=vol[:, ::2, ::2], chunks=(1, 32, 32))
    g.attrs["multiscales"] = [ngff_multiscales("img", [VoxelSize(40, 4, 4), VoxelSize(40, 8, 8)])]
    v = open_volume(tmp_path / "img.ome.zarr")
    assert detect_format(tmp_path / "img.ome.zarr").name == "ome-zarr"
    _check(v, vol, (40, 4, 4))


def test_bioformats2raw_layout(tmp_path, vol):
    """Series in groups 0, 1, ... each a 5D (t, c, z, y, x) OME-Zarr image."""
    import zarr

    from ssl_em.data.archive import ngff_multiscales

    root = zarr.open_group(str(tmp_path / "conv.zarr"), mode="w", zarr_format=2)
    root.attrs["bioformats2raw.layout"] = 3
    ms = ngff_multiscales("s0", [VoxelSize(30, 6, 6)])
    ms["axes"] = [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"}] + ms["axes"]
    for d in ms["datasets"]:
        d["coordinateTransformations"][0]["scale"] = [1.0, 1.0] + d["coordinateTransformations"][0]["scale"]
    series = root.create_group("0")
    series.create_array("0", data=vol[None, None], chunks=(1, 1, 1, 32, 32))
    series.attrs["multiscales"] = [ms]
    assert detect_format(tmp_path / "conv.zarr").name == "bioformats2raw"
    _check(open_volume(tmp_path / "conv.zarr"), vol, (30, 6, 6))
    root.create_group("1").attrs["multiscales"] = [ms]
    root["1"].create_array("0", data=vol[None, None], chunks=(1, 1, 1, 32, 32))
    with pytest.raises(VolumeError, match=r"holds 2 series \(0, 1\); open one as .*conv\.zarr:N"):
        open_volume(tmp_path / "conv.zarr")
    _check(open_volume(f"{tmp_path / 'conv.zarr'}:1"), vol, (30, 6, 6))


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_plain_zarr_array_and_single_array_group(tmp_path, vol, zarr_format):
    import zarr

    data = vol.astype(np.uint16) * 100
    zarr.create_array(str(tmp_path / "a.zarr"), data=data, chunks=(2, 16, 16), zarr_format=zarr_format)
    _check(open_volume(tmp_path / "a.zarr"), data)
    assert not open_volume(tmp_path / "a.zarr").voxel_size_known

    g = zarr.open_group(str(tmp_path / "g.zarr"), mode="w", zarr_format=zarr_format)
    g.create_group("sub").create_array("raw", data=data, chunks=(2, 16, 16))
    assert detect_format(tmp_path / "g.zarr").name == "zarr-group"
    _check(open_volume(tmp_path / "g.zarr", voxel_size="30,5,5"), data, (30, 5, 5))
    _check(open_volume(f"{tmp_path / 'g.zarr'}:sub/raw"), data)

    g.create_array("labels", data=data, chunks=(2, 16, 16))
    with pytest.raises(VolumeError, match=r"^.*g\.zarr: zarr group holds 2 arrays"):
        open_volume(tmp_path / "g.zarr")


def test_n5_in_java_axis_order_with_voxel_size(tmp_path, vol):
    """N5 as Java tools write it: dimensions and pixelResolution fastest first (x, y, z)."""
    import json

    import tensorstore as ts

    data = vol.astype(np.float32) / 255
    path = tmp_path / "v.n5"
    store = ts.open(
        {"driver": "n5", "kvstore": {"driver": "file", "path": str(path)},
         "metadata": {"dimensions": list(data.shape[::-1]), "blockSize": [16, 16, 2], "dataType": "float32", "compression": {"type": "gzip"}}},
        create=True,
    ).result()
    store.write(data.T).result()
    assert detect_format(path).name == "n5"
    _check(open_volume(path, voxel_size=8), data, (8, 8, 8))
    assert not open_volume(path).voxel_size_known

    attrs = json.loads((path / "attributes.json").read_text())
    (path / "attributes.json").write_text(json.dumps(attrs | {"pixelResolution": {"dimensions": [4.0, 5.0, 0.04], "unit": "um"}}))
    _check(open_volume(path), data, (40, 5000, 4000))
    (path / "attributes.json").write_text(json.dumps(attrs | {"resolution": [4, 5, 40]}))
    _check(open_volume(path), data, (40, 5, 4))
    cosem = {"transform": {"axes": ["z", "y", "x"], "scale": [30, 8, 6], "units": ["nm", "nm", "nm"]}}
    (path / "attributes.json").write_text(json.dumps(attrs | cosem))
    _check(open_volume(path), data, (30, 8, 6))


# -- HDF5 ---------------------------------------------------------------------------------
def test_hdf5_inner_path_single_dataset_and_errors(tmp_path, vol):
    import h5py

    with h5py.File(tmp_path / "one.h5", "w") as f:
        ds = f.create_dataset("volumes/raw", data=vol, chunks=(1, 16, 16), compression="lzf")
        ds.attrs["resolution"] = (40.0, 4.0, 4.0)
    _check(open_volume(tmp_path / "one.h5"), vol, (40, 4, 4))
    _check(open_volume(f"{tmp_path / 'one.h5'}:/volumes/raw"), vol, (40, 4, 4))

    with h5py.File(tmp_path / "two.h5", "w") as f:
        f["raw"] = vol
        f["labels"] = vol.astype(np.int32)
        f["labels"].attrs["element_size_um"] = (0.03, 0.005, 0.005)
    with pytest.raises(VolumeError, match=r"two\.h5: holds 2 datasets"):
        open_volume(tmp_path / "two.h5")
    _check(open_volume(f"{tmp_path / 'two.h5'}:/labels"), vol.astype(np.int32), (30, 5, 5))
    with pytest.raises(VolumeError, match=r"two\.h5: no dataset 'nope'"):
        open_volume(f"{tmp_path / 'two.h5'}:/nope")


def test_hdf5_reopens_after_pickling(tmp_path, vol):
    import h5py

    with h5py.File(tmp_path / "v.h5", "w") as f:
        f["raw"] = vol
    v = open_volume(tmp_path / "v.h5")
    v.read(0)  # opens the handle
    clone = pickle.loads(pickle.dumps(v))
    assert clone._handle is None
    np.testing.assert_array_equal(clone.read(*REGION), vol[REGION])


# -- TIFF ---------------------------------------------------------------------------------
def test_tiff_imagej_voxel_size_and_memmap(tmp_path, vol):
    import tifffile

    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, vol, imagej=True, resolution=(1 / 0.004, 1 / 0.004), metadata={"spacing": 0.05, "unit": "um", "axes": "ZYX"})
    v = open_volume(path)
    _check(v, vol, (50, 4, 4))
    assert isinstance(v.handle, np.memmap)  # uncompressed: region reads touch only their bytes


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_tiff_ome_compressed_reads_pages(tmp_path, vol, dtype):
    import tifffile

    data = vol.astype(dtype) * 3
    path = tmp_path / "stack.ome.tif"
    tifffile.imwrite(path, data, ome=True, compression="zlib",
                     metadata={"axes": "ZYX", "PhysicalSizeX": 6, "PhysicalSizeXUnit": "nm", "PhysicalSizeY": 6, "PhysicalSizeYUnit": "nm", "PhysicalSizeZ": 0.03, "PhysicalSizeZUnit": "µm"})
    v = open_volume(path)
    _check(v, data, (30, 6, 6))
    assert not isinstance(v.handle, np.ndarray)  # compressed: decoded page by page
    assert pickle.loads(pickle.dumps(v)).read(2).shape == (1, 48, 64)


def test_tiff_2d_is_one_slice_and_garbage_is_an_error(tmp_path, vol):
    import tifffile

    tifffile.imwrite(tmp_path / "plane.tif", vol[0])
    v = open_volume(tmp_path / "plane.tif", voxel_size=4)
    assert v.shape == (1, 48, 64) and v.voxel_size == VoxelSize(4, 4, 4)
    (tmp_path / "garbage.tif").write_bytes(b"this is not a tiff at all" * 10)
    with pytest.raises(VolumeError, match=rf"^{tmp_path / 'garbage.tif'}: not a readable TIFF"):
        open_volume(tmp_path / "garbage.tif")


@pytest.mark.parametrize("compression", [None, "zlib"])  # memory-mapped, and decoded page by page
def test_rgb_tiff_reads_as_luminance(tmp_path, vol, compression):
    import tifffile

    rgb = np.stack([vol, vol // 2, 255 - vol], axis=-1)  # (z, y, x, 3)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb", compression=compression)
    want = np.rint(rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).astype(np.uint8)
    _check(open_volume(tmp_path / "rgb.tif"), want)
    gray_as_rgb = np.repeat(vol[..., None], 3, axis=-1)  # a gray stack some viewer saved as RGB
    tifffile.imwrite(tmp_path / "gray.tif", gray_as_rgb, photometric="rgb", compression=compression)
    _check(open_volume(tmp_path / "gray.tif"), vol)
    (tmp_path / "slices").mkdir()  # a folder of RGB TIFF slices reads the same way
    for z, plane in enumerate(rgb):
        tifffile.imwrite(tmp_path / "slices" / f"s{z}.tif", plane, photometric="rgb", compression=compression)
    _check(open_volume(tmp_path / "slices"), want)


@pytest.mark.parametrize("depth", [3, 4])
@pytest.mark.parametrize("compression", [None, "zlib"])
def test_plain_imwrite_of_a_short_stack_is_that_many_slices(tmp_path, vol, depth, compression):
    """tifffile.imwrite of a (3, H, W) or (4, H, W) array writes one planar "RGB(A)" page;
    tifffile reads it back as the stack, and so must we (it was read as one slice)."""
    import tifffile

    stack = np.ascontiguousarray(vol[:depth])
    tifffile.imwrite(tmp_path / "short.tif", stack, compression=compression)
    assert tifffile.imread(tmp_path / "short.tif").shape == stack.shape
    v = open_volume(tmp_path / "short.tif")
    assert v.shape == stack.shape
    _check(v, stack)
    np.testing.assert_array_equal(v.read(slice(1, 2)), stack[1:2])


# -- folders of 2D images ---------------------------------------------------------------------
def test_png_folder_natural_order(tmp_path, vol):
    from PIL import Image

    folder = tmp_path / "slices"
    folder.mkdir()
    for z, name in enumerate(["1.png", "2.png", "10.png", "11.png"]):  # plain sort would give 1, 10, 11, 2
        Image.fromarray(vol[z]).save(folder / name)
    v = open_volume(folder)
    assert detect_format(folder).name == "image-folder"
    _check(v, vol)
    assert not v.voxel_size_known


def test_png_16bit_and_single_file(tmp_path, vol):
    from PIL import Image

    data = vol.astype(np.uint16) * 200
    Image.fromarray(data[0]).save(tmp_path / "one.png")
    v = open_volume(tmp_path / "one.png")
    assert v.shape == (1, 48, 64) and v.dtype == np.uint16
    np.testing.assert_array_equal(v[:][0], data[0])


def test_folder_errors_name_the_file(tmp_path, vol):
    from PIL import Image

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VolumeError, match=rf"^{empty}: folder holds no images"):
        open_volume(empty)

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(vol[0]).save(mixed / "0.png")
    Image.fromarray(vol[1, :40]).save(mixed / "1.png")
    with pytest.raises(VolumeError, match=rf"^{mixed / '1.png'}: image is 40x64 uint8 but 0.png is 48x64"):
        open_volume(mixed)

    trunc = tmp_path / "trunc"
    trunc.mkdir()
    for z in range(2):
        Image.fromarray(vol[z]).save(trunc / f"{z}.png")
    data = (trunc / "1.png").read_bytes()
    (trunc / "1.png").write_bytes(data[: len(data) // 2])
    v = open_volume(trunc)  # headers are intact; the damage shows when pixels are decoded
    with pytest.raises(VolumeError, match=rf"^{trunc / '1.png'}: unreadable or truncated image"):
        v.read()


def test_unsupported_and_missing(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(VolumeError, match=r"notes\.txt: unsupported format '.txt'"):
        open_volume(tmp_path / "notes.txt")
    with pytest.raises(VolumeError, match=r"missing\.tif: no such file"):
        open_volume(tmp_path / "missing.tif")


# -- MRC ----------------------------------------------------------------------------------------
def test_mrc_voxel_size_from_angstrom(tmp_path, vol):
    import mrcfile

    data = vol.astype(np.int16) - 100
    with mrcfile.new(tmp_path / "tomo.mrc") as mrc:
        mrc.set_data(data)
        mrc.voxel_size = (20.0, 20.0, 50.0)  # x, y, z in Å
    v = open_volume(tmp_path / "tomo.mrc")
    _check(v, data, (5, 2, 2))
    (tmp_path / "short.mrc").write_bytes((tmp_path / "tomo.mrc").read_bytes()[:1500])
    with pytest.raises(VolumeError, match=r"short\.mrc: not a readable MRC file"):
        open_volume(tmp_path / "short.mrc")


def test_fingerprint_tracks_changes(tmp_path, vol):
    import os

    import tifffile

    path = tmp_path / "v.tif"
    tifffile.imwrite(path, vol, photometric="minisblack")
    first = source_fingerprint(path)
    assert source_fingerprint(path) == first
    os.utime(path, ns=(1, 1))
    assert source_fingerprint(path) != first


# -- real EM ---------------------------------------------------------------------------------------
REAL = [
    ("isbi2012/test", (30, 512, 512), np.uint8),
    ("flyem_fibsem_sample1/grayscale_maps", (250, 250, 250), np.uint8),
    ("gala_fibsem/train-image.h5", (50, 100, 200), np.uint8),
    ("gala_fibsem/test-gt.lzf.h5:/stack", (50, 100, 200), np.int32),
    ("bioimageio_crops/cremi_center_crop_32x360x360__zenodo5874741.tif", (32, 360, 360), np.uint8),
    ("bioimageio_crops/mitoem_center_crop_32x256x256__zenodo5874841.tif", (32, 256, 256), np.uint8),
    ("bioimageio_crops/em2d_512__zenodo5817052.tif", (1, 512, 512), np.uint8),
]


@pytest.mark.realdata
@pytest.mark.parametrize("spec, shape, dtype", REAL, ids=[r[0].split("/")[-1][:24] for r in REAL])
def test_real_data_opens(shared_data, spec, shape, dtype):
    v = open_volume(f"{shared_data}/{spec}")
    assert v.shape == shape and v.dtype == dtype
    block = v.read(slice(shape[0] - 1, shape[0]), slice(0, 64), slice(0, 64))
    assert block.shape == (1, 64, 64) and block.std() > 0


@pytest.mark.realdata
def test_real_png_order_and_lzf_labels(shared_data):
    from PIL import Image

    isbi = open_volume(shared_data / "isbi2012" / "test")
    np.testing.assert_array_equal(isbi.read(2)[0], np.asarray(Image.open(shared_data / "isbi2012/test/2.png")))
    np.testing.assert_array_equal(isbi.read(10)[0], np.asarray(Image.open(shared_data / "isbi2012/test/10.png")))
    labels = open_volume(shared_data / "gala_fibsem" / "train-gt.lzf.h5").read(slice(0, 50))
    assert len(np.unique(labels)) > 50  # dense neuron ids survive LZF decoding
