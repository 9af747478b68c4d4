"""ssl_em's OME-Zarr outputs, opened with the ecosystem's own readers, not ours.

ome-zarr-py's `Reader` (what napari-ome-zarr builds on) must find the prediction's image and
labels with scales equal to the voxel size in nanometres; ome-zarr-models (the NGFF models
published on PyPI) must validate the metadata; every stored dtype must be one neuroglancer's
zarr source decodes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ssl_em.data.normalize import IntensityStats, Normalization
from ssl_em.data.volume import ArrayVolume
from ssl_em.inference.predict import predict_volume
from ssl_em.inference.store import PredictSettings

ome_zarr = pytest.importorskip("ome_zarr", reason="ome-zarr (dev extra) reads the stores as napari does")
ome_zarr_models = pytest.importorskip("ome_zarr_models", reason="ome-zarr-models (dev extra) validates NGFF metadata")

VOXEL = (50.0, 4.0, 4.0)  # serial-section EM: z 12.5x coarser than y, x
CLASSES = ["membrane", "cytoplasm", "mitochondrion"]
#: What neuroglancer's zarr v2 source decodes (its DataType enum); float16 and float64 are not among them.
NEUROGLANCER = {np.dtype(t) for t in ("uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "float32")}


def _walk(group):
    yield from (a for _, a in group.arrays())
    for _, g in group.groups():
        yield from _walk(g)


def nodes_of(path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    return list(Reader(parse_url(str(path)))())


@pytest.fixture(scope="module")
def prediction(tmp_path_factory):
    torch.manual_seed(0)
    net = nn.Conv2d(1, len(CLASSES), 1).eval()
    image = (np.random.default_rng(0).random((4, 40, 48)) * 255).astype(np.uint8)
    out = tmp_path_factory.mktemp("pred") / "p.zarr"
    settings = PredictSettings(window=32, overlap=8, slab=2, planes=("xy", "xz", "yz"), instances="2d")
    predict_volume(net, ArrayVolume(image, voxel_size=VOXEL), out, CLASSES, Normalization(), settings, model_id="m",
                   stats=IntensityStats.compute(image), progress=False)
    return out


def test_prediction_opens_in_ome_zarr_py_with_voxel_size_and_names(prediction):
    from ome_zarr.reader import Label, Multiscales

    nodes = nodes_of(prediction)
    images = [n for n in nodes if n.load(Multiscales) and not n.load(Label)]
    labels = {n.metadata["name"]: n for n in nodes if n.load(Label)}
    assert len(images) == 1 and set(labels) == {"semantic", "instances"}
    image = images[0]
    assert [a["unit"] for a in image.metadata["axes"] if a["type"] == "space"] == ["nanometer"] * 3
    assert image.metadata["coordinateTransformations"] == [[{"type": "scale", "scale": [1.0, *VOXEL]}]]
    assert image.metadata["channel_names"] == CLASSES  # omero channel labels: napari names each layer by class
    assert image.data[0].dtype == np.uint8 and int(image.data[0].max().compute()) <= 255
    for node in labels.values():
        assert node.metadata["coordinateTransformations"] == [[{"type": "scale", "scale": list(VOXEL)}]]
    semantic = labels["semantic"]
    assert {v: p["class"] for v, p in semantic.metadata["properties"].items()} == {1: "membrane", 2: "cytoplasm", 3: "mitochondrion"}
    assert set(semantic.metadata["color"]) == {1, 2, 3}
    values = np.unique(semantic.data[0].compute())
    assert values.min() >= 1 and values.max() <= len(CLASSES)  # every pixel predicted, none drawn as background
    probs = image.data[0].compute().astype(np.float32) / 255
    np.testing.assert_array_equal(semantic.data[0].compute(), probs.argmax(0) + 1)


def test_prediction_metadata_validates_against_ngff_models(prediction):
    import zarr
    from ome_zarr_models.v04 import Image, ImageLabel

    root = zarr.open_group(str(prediction), mode="r")
    image = Image.from_zarr(root)
    assert image.attributes.omero is not None and [c.label for c in image.attributes.omero.channels] == CLASSES
    assert sorted(image.labels.attributes.labels) == ["instances", "semantic"]
    for name in ("semantic", "instances"):
        ImageLabel.from_zarr(root["labels"][name])
    for plane in ("xz", "yz"):
        plane_image = Image.from_zarr(root["planes"][plane])
        assert plane_image.attributes.multiscales[0].datasets[0].coordinateTransformations[0].scale == [1.0, *VOXEL]


def test_every_stored_dtype_is_one_neuroglancer_reads(prediction):
    import zarr

    arrays = list(_walk(zarr.open_group(str(prediction), mode="r")))
    assert len(arrays) == 5  # probabilities, semantic, instances, xz and yz planes
    assert {a.dtype for a in arrays} <= NEUROGLANCER, {a.path: a.dtype for a in arrays}


def test_evaluate_reads_shifted_labels_back(prediction, tmp_path):
    """`ssl-em evaluate` maps stored label k + 1 back to class k: a ground truth equal to the
    prediction's argmax scores perfectly."""
    import tifffile
    import zarr

    from ssl_em.inference.evaluate import evaluate

    classes = zarr.open_group(str(prediction), mode="r")["labels/semantic/0"][:].astype(np.uint8) - 1
    tifffile.imwrite(tmp_path / "gt.tif", classes, photometric="minisblack")
    scores = evaluate(str(prediction), str(tmp_path / "gt.tif"), task="semantic", label_values=[0, 1, 2])
    assert scores["accuracy"] == 1.0 and list(scores["per_class"]) == CLASSES


# -- the archive: a collection of plain NGFF images -------------------------------------------


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    import tifffile

    from ssl_em.data.ingest import ingest

    tmp = tmp_path_factory.mktemp("archive")
    image = (np.random.default_rng(1).random((4, 96, 80)) * 255).astype(np.uint8)
    sources = []
    for name, (z, y, x) in {"aniso": (40.0, 4.0, 4.0), "iso": (8.0, 8.0, 8.0)}.items():
        tifffile.imwrite(tmp / f"{name}.tif", image, photometric="minisblack", imagej=True, resolution=(1e3 / x, 1e3 / y),
                         metadata={"spacing": z / 1e3, "unit": "um", "axes": "ZYX"})
        sources.append(tmp / f"{name}.tif")
    assert not ingest(sources, tmp / "a.zarr", tile_size=32, progress=False).failed
    return tmp / "a.zarr"


def test_archive_root_lists_its_images_as_a_bioformats2raw_collection(archive):
    """The root validates as bioformats2raw (ome-zarr-models); its series and OME-XML name
    every complete image at the path napari-ome-zarr follows (the ID after "Image:"), and
    ome-zarr-py's Reader opens each one with its voxel sizes in nanometres."""
    import json
    from xml.etree import ElementTree as ET

    import zarr
    from ome_zarr.reader import Multiscales
    from ome_zarr_models.v04 import Image
    from ome_zarr_models.v04.bioformats2raw import BioFormats2RawAttrs

    BioFormats2RawAttrs.model_validate(json.loads((archive / ".zattrs").read_text()))
    series = json.loads((archive / "OME" / ".zattrs").read_text())["series"]
    assert series == ["aniso", "iso"]
    xml = ET.parse(archive / "OME" / "METADATA.ome.xml").getroot()
    ids = [c.attrib["ID"] for c in xml if c.tag.endswith("Image")]
    assert ids == [f"Image:{s}" for s in series]
    pixels = [p.attrib for p in xml.iter() if p.tag.endswith("Pixels")]
    assert [(p["SizeZ"], p["SizeY"], p["SizeX"], p["PhysicalSizeZ"]) for p in pixels] == [("4", "96", "80", "40"), ("4", "96", "80", "8")]
    for name, voxel in zip(series, ((40.0, 4.0, 4.0), (8.0, 8.0, 8.0))):
        Image.from_zarr(zarr.open_group(str(archive / name), mode="r"))
        (node,) = [n for n in nodes_of(archive / name) if n.load(Multiscales)]
        scales = [t[0]["scale"] for t in node.metadata["coordinateTransformations"]]
        assert scales[0] == list(voxel) and len(scales) == len(node.data)
        assert [a["unit"] for a in node.metadata["axes"]] == ["nanometer"] * 3
        assert {d.dtype for d in node.data} <= NEUROGLANCER


def test_napari_opens_the_archive_root_as_one_named_layer_per_image(archive):
    """napari's own OME-Zarr plugin, given the root (what `napari ARCHIVE.zarr` does): one
    grey image layer per archive image, named after it, in nanometres, at its contrast."""
    napari_ome_zarr = pytest.importorskip("napari_ome_zarr", reason="napari-ome-zarr (dev extra) is napari's OME-Zarr reader")
    import json

    reader = napari_ome_zarr.napari_get_reader(str(archive))
    assert reader is not None
    layers = reader(str(archive))
    assert [(kind, meta["name"]) for _, meta, kind in layers] == [("image", "aniso: aniso"), ("image", "iso: iso")]
    for (data, meta, _), voxel in zip(layers, ((40.0, 4.0, 4.0), (8.0, 8.0, 8.0))):
        assert data[0].shape == (4, 96, 80) and meta["scale"] == list(voxel)
        assert meta["units"] == ("nanometer",) * 3
        stats = json.loads((archive / meta["name"].split(":")[0] / ".zattrs").read_text())["ssl_em"]["stats"]
        assert meta["contrast_limits"] == [stats["lo"], stats["hi"]] and stats["lo"] < stats["hi"]


def test_archive_still_opens_in_ssl_em(archive):
    from ssl_em.data.archive import Archive
    from ssl_em.data.readers import open_volume
    from ssl_em.data.volume import VolumeError

    assert [im.name for im in Archive(archive).images] == ["aniso", "iso"]
    assert open_volume(archive / "iso").voxel_size.as_tuple() == (8.0, 8.0, 8.0)
    assert open_volume(f"{archive}:aniso").voxel_size.as_tuple() == (40.0, 4.0, 4.0)
    with pytest.raises(VolumeError, match="holds 2 series"):
        open_volume(archive)


def test_ome_xml_pixel_types_never_narrow():
    """int64, uint64 and float16 were listed as uint8 (a reader would wrap the values)."""
    import re

    from ssl_em.ngff import ome_xml

    images = [(f"im{k}", (1, 2, 2), dt, None) for k, dt in enumerate(["uint8", ">u2", "int64", "uint64", "float16", "float32", "float64"])]
    types = re.findall(r'Type="([a-z0-9]+)"', ome_xml(images))
    assert types == ["uint8", "uint16", "double", "double", "float", "float", "double"]


def test_which_ngff_models_read_the_archive_root_and_its_images(archive):
    """What the docs say about ome-zarr-models (the NGFF reference models): its generic
    `open_ome_zarr` takes each archive image for an NGFF Image and the root for a valid
    bioformats2raw group, but lists none of the root's images: it looks only for series
    named 0, 1, ... and ignores the OME `series` list that names ours (the layout allows
    both). Open the images as ARCHIVE.zarr/<name>; if this fails, the docs need updating."""
    import zarr
    from ome_zarr_models import open_ome_zarr
    from ome_zarr_models.v04 import Image
    from ome_zarr_models.v04.bioformats2raw import BioFormats2Raw

    root = zarr.open_group(str(archive), mode="r")
    collection = open_ome_zarr(root)
    assert isinstance(collection, BioFormats2Raw) and collection.image_paths == []
    for name in ("aniso", "iso"):
        assert isinstance(open_ome_zarr(root[name]), Image)
