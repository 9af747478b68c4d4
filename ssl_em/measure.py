"""`ssl-em measure PREDICTION --out objects.csv`: one row per object, in nanometres.

Objects are the connected components of each semantic class (class by class, full
connectivity: faces, edges and corners touch) or, with `--instances`, the ids of an instance
prediction. They are measured in 3D (default for a volume) or slice by slice in 2D (`--2d`,
and always for a single image) with scikit-image's `regionprops_table` and its `spacing`
argument, so every size is physical. Columns (3D; in 2D area, perimeter and a `z` column):

    class, object             class name, object id (1.. per class; the instance id for instances)
    volume_nm3                voxel count x voxel volume
    surface_area_nm2          area of the marching-cubes mesh at level 0.5 (scikit-image), the
                              boundary half-way between object and background voxel centres
    area_nm2, perimeter_nm    2D: pixel count x pixel area; scikit-image's `perimeter` (which
                              supports square pixels only; other pixels: the length of the
                              marching-squares contour at 0.5, the 2D twin of the 3D mesh)
    equivalent_diameter_nm    diameter of the ball (disc) of the same volume (area)
    extent_{z,y,x}_nm         bounding box side along each axis (voxels x voxel size)
    elongation                major / minor axis length of the inertia ellipsoid (1: round;
                              inf: a one-voxel-thin line, nan: a single voxel)
    mean_intensity            mean raw intensity (of the image the prediction was made from,
                              or `--image`), in the image's own units; empty when no image
    centroid_{z,y,x}_nm       centre of mass, nm from the volume's corner
    touches_border            the object reaches the volume's edge (in 2D: the slice's edge),
                              so it is cut and its size is a lower bound

The prediction is an `ssl-em predict` output (OUT.zarr: labels/semantic holds class + 1, named
by its metadata; labels/instances holds ids; its voxel size comes from the NGFF scales and its
raw image from the path it recorded) or any label volume ssl_em reads (value v > 0 is class
"v"; `--voxel-size` gives the voxel size when the file has none). A per-class summary (count,
mean and median size, objects cut by the border) is printed and written to
OUT_summary.csv beside OUT. The label volume is held in memory (its connected components need
the whole of it); so is the raw image in 3D, which `--2d` reads slice by slice.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ssl_em import atomic
from ssl_em.data.volume import UNKNOWN_VOXEL_SIZE, Volume, VoxelSize
from ssl_em.errors import UserError, check_writable_file


class MeasureError(UserError):
    """The prediction, image or flags cannot be measured; the message names which."""


#: Column order of the 3D and 2D tables (mean_intensity is None without an image).
COLUMNS_3D = ("class", "object", "volume_nm3", "surface_area_nm2", "equivalent_diameter_nm", "extent_z_nm", "extent_y_nm", "extent_x_nm",
              "elongation", "mean_intensity", "centroid_z_nm", "centroid_y_nm", "centroid_x_nm", "touches_border")
COLUMNS_2D = ("class", "object", "z", "area_nm2", "perimeter_nm", "equivalent_diameter_nm", "extent_y_nm", "extent_x_nm",
              "elongation", "mean_intensity", "centroid_z_nm", "centroid_y_nm", "centroid_x_nm", "touches_border")


# -- one labelled array ----------------------------------------------------------------------------


def _surface_area(spacing: tuple[float, ...]):
    """regionprops extra property: mesh area (3D) or contour length (2D) of a region, in nm^2 / nm."""
    from skimage.measure import find_contours, marching_cubes, mesh_surface_area

    def surface(mask: np.ndarray) -> float:
        padded = np.pad(mask.astype(np.float32), 1)  # closed surface even where the bbox ends
        if mask.ndim == 3:
            verts, faces, _, _ = marching_cubes(padded, 0.5, spacing=spacing)
            return float(mesh_surface_area(verts, faces))
        return float(sum(np.linalg.norm(np.diff(c * np.asarray(spacing), axis=0), axis=1).sum() for c in find_contours(padded, 0.5)))

    return surface


def measure_objects(objects: np.ndarray, spacing: tuple[float, ...], intensity: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Measure every id > 0 of `objects`: (Z, Y, X) or (Y, X) integer ids; `spacing` nm per axis
    (same length); `intensity` (same shape) raw values for mean_intensity.

    Returns columns (one entry per object, ids ascending): object, size (volume or area),
    surface (mesh area or perimeter), equivalent_diameter_nm, extent_<axis>_nm, elongation,
    mean_intensity (only with `intensity`), centroid_<axis>_nm, touches_border. Names follow
    COLUMNS_3D / COLUMNS_2D except size and surface, which the caller names."""
    from skimage.measure import regionprops_table

    ndim = objects.ndim
    spacing = tuple(float(s) for s in spacing)
    names = "zyx"[-ndim:]
    props = ["label", "area", "bbox", "centroid", "equivalent_diameter_area", "axis_major_length", "axis_minor_length"]
    props += ["intensity_mean"] if intensity is not None else []
    extra = []
    if ndim == 2 and spacing[0] == spacing[1]:
        props.append("perimeter")
    else:  # 3D mesh area, or a 2D contour length: skimage's perimeter takes square pixels only
        extra.append(_surface_area(spacing))
    t = regionprops_table(objects, intensity_image=intensity, spacing=spacing, properties=props, extra_properties=extra)
    n = len(t["label"])
    lo = np.stack([t[f"bbox-{i}"] for i in range(ndim)], 1) if n else np.zeros((0, ndim), int)
    hi = np.stack([t[f"bbox-{i + ndim}"] for i in range(ndim)], 1) if n else np.zeros((0, ndim), int)
    with np.errstate(divide="ignore", invalid="ignore"):
        elongation = t["axis_major_length"] / t["axis_minor_length"]
    out = {"object": t["label"].astype(np.int64), "size": t["area"].astype(np.float64), "surface": np.asarray(t["perimeter"] if "perimeter" in t else t["surface"], np.float64),
           "equivalent_diameter_nm": t["equivalent_diameter_area"].astype(np.float64)}
    for i, a in enumerate(names):
        out[f"extent_{a}_nm"] = (hi[:, i] - lo[:, i]) * spacing[i]
    out["elongation"] = elongation.astype(np.float64)
    if intensity is not None:
        out["mean_intensity"] = t["intensity_mean"].astype(np.float64)
    for i, a in enumerate(names):
        out[f"centroid_{a}_nm"] = t[f"centroid-{i}"].astype(np.float64)  # regionprops scales centroids by `spacing`
    out["touches_border"] = ((lo == 0) | (hi == np.asarray(objects.shape))).any(1) if n else np.zeros(0, bool)
    return out


# -- a whole prediction -----------------------------------------------------------------------------


@dataclass
class Labels:
    """What to measure: `array` (Z, Y, X) stored values; `classes` stored value -> class name
    (semantic), or None for instance ids; voxel size in nm; the raw image if known."""

    array: np.ndarray
    classes: dict[int, str] | None
    voxel_size: VoxelSize
    voxel_size_known: bool
    image: str | None = None


def measure(labels: np.ndarray, voxel_size: tuple[float, float, float], classes: dict[int, str] | None = None, intensity: Volume | np.ndarray | None = None,
            mode: str = "3d", select: list[str] | None = None) -> list[dict]:
    """Rows (dicts keyed by COLUMNS_3D or COLUMNS_2D) for every object.

    labels: (Z, Y, X) ints. classes: stored value -> class name: each class's connected
    components are its objects (values not listed are background); None: `labels` holds
    instance ids, one object each (class "instance"). voxel_size: (z, y, x) nm. intensity: the
    raw (Z, Y, X) image, read slice by slice when a Volume. mode "3d" or "2d" (slice by slice).
    select: class names to measure (default: all)."""
    from skimage.measure import label as connected

    labels = np.asarray(labels)
    if labels.ndim == 2:
        labels = labels[None]
    if intensity is not None and tuple(intensity.shape) != labels.shape:
        raise MeasureError(f"--image: shape {tuple(intensity.shape)} differs from the labels' {labels.shape}")
    groups = {"instance": None} if classes is None else {name: value for value, name in classes.items()}
    if select:
        unknown = [s for s in select if s not in groups]
        if unknown:
            raise MeasureError(f"--classes {','.join(select)}: {unknown} not among the prediction's classes {list(groups)}")
        groups = {s: groups[s] for s in select}
    columns = COLUMNS_3D if mode == "3d" else COLUMNS_2D
    size, surface = ("volume_nm3", "surface_area_nm2") if mode == "3d" else ("area_nm2", "perimeter_nm")
    vz, vy, vx = voxel_size
    rows: list[dict] = []
    planes = [slice(None)] if mode == "3d" else list(range(labels.shape[0]))
    for z in planes:
        block = labels[z]
        image = None if intensity is None else np.asarray(intensity[z] if isinstance(intensity, np.ndarray) else intensity.read(z if mode == "2d" else None)).astype(np.float64)
        if mode == "2d" and image is not None:
            image = image.reshape(block.shape)
        spacing = (vz, vy, vx) if mode == "3d" else (vy, vx)
        for name, value in groups.items():
            ids = block if value is None else connected(block == value, connectivity=block.ndim)
            cols = measure_objects(ids, spacing, image)
            cols[size], cols[surface] = cols.pop("size"), cols.pop("surface")
            if mode == "2d":
                cols["z"] = np.full(len(cols["object"]), z)
                cols["centroid_z_nm"] = np.full(len(cols["object"]), z * vz)
            for k in range(len(cols["object"])):
                rows.append({c: (name if c == "class" else cols[c][k].item() if c in cols else None) for c in columns})
    return rows


def object_table(labels: np.ndarray, voxel_size: tuple[float, float, float], classes: dict[int, str], intensity: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Every class's connected components in one id volume, and their table.

    labels: (Z, Y, X) class values (`classes`: value -> name; other values are background),
    measured in 3D, or in 2D when Z is 1. Returns (ids (Z, Y, X) uint32, ids unique over
    classes; columns of COLUMNS_3D or COLUMNS_2D less `z`, with "index" = the id), the shape
    of a napari labels layer's features table."""
    from skimage.measure import label as connected

    labels = np.asarray(labels)
    ids, names = np.zeros(labels.shape, np.uint32), []
    for value, name in classes.items():
        comp = connected(labels == value, connectivity=labels.ndim)
        ids[comp > 0] = comp[comp > 0] + len(names)
        names += [name] * int(comp.max())
    flat = labels.shape[0] == 1
    vz, vy, vx = voxel_size
    image = None if intensity is None else np.asarray(intensity, np.float64)
    cols = measure_objects(ids[0] if flat else ids, (vy, vx) if flat else (vz, vy, vx), None if image is None else image.reshape(labels.shape)[0] if flat else image)
    size, surface = ("area_nm2", "perimeter_nm") if flat else ("volume_nm3", "surface_area_nm2")
    cols[size], cols[surface] = cols.pop("size"), cols.pop("surface")
    if flat:
        cols["centroid_z_nm"] = np.zeros(len(cols["object"]))
    order = [c for c in (COLUMNS_2D if flat else COLUMNS_3D) if c in cols and c not in ("class", "object", "z")]
    table = {"index": cols["object"], "class": np.array([names[i - 1] for i in cols["object"]], dtype=object)} | {c: cols[c] for c in order}
    return ids, table


def summarize(rows: list[dict]) -> list[dict]:
    """Per class: count, mean and median size (volume or area), mean equivalent diameter,
    objects touching the border."""
    size = "volume_nm3" if rows and "volume_nm3" in rows[0] else "area_nm2"
    out = []
    for name in dict.fromkeys(r["class"] for r in rows):
        mine = [r for r in rows if r["class"] == name]
        sizes = np.array([r[size] for r in mine])
        out.append({"class": name, "count": len(mine), f"mean_{size}": float(sizes.mean()), f"median_{size}": float(np.median(sizes)),
                    "mean_equivalent_diameter_nm": float(np.mean([r["equivalent_diameter_nm"] for r in mine])),
                    "touching_border": int(sum(r["touches_border"] for r in mine))})
    return out


def write_csv(path: str | Path, rows: list[dict], columns: tuple[str, ...] | None = None) -> None:
    """CSV with a header, written to a temporary file and renamed (never half a table)."""
    columns = columns or (tuple(rows[0]) if rows else ())
    atomic.write_csv(path, columns, ({k: ("" if v is None else v) for k, v in r.items()} for r in rows))


def summary_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(f"{out.stem}_summary{out.suffix or '.csv'}")


# -- reading a prediction -------------------------------------------------------------------------


def open_labels(spec: str, instances: bool | None = None, voxel_size=None) -> Labels:
    """The labels to measure from an `ssl-em predict` output or any label volume.

    instances None: the prediction's instances when it holds them, else its semantic labels."""
    from ssl_em.data.readers.zarr_store import ZarrVolume, group_attributes, ome_zarr_levels
    from ssl_em.data.readers.open import as_volume

    path = Path(spec)
    if not path.exists() and ":" not in spec:
        raise MeasureError(f"{spec}: no such file or folder")
    attrs = group_attributes(path).get("ssl_em", {}) if path.is_dir() else {}
    if attrs.get("format") == "ssl_em.prediction":
        if not attrs.get("complete"):
            raise MeasureError(f"{spec}: prediction is incomplete (re-run `ssl-em predict` to finish it)")
        has_instances = (path / "labels" / "instances" / "0").is_dir()
        if instances and not has_instances:
            raise MeasureError(f"{spec}: --instances given, but the prediction holds no labels/instances (predicted with --instances none?)")
        use_instances = has_instances if instances is None else instances
        group = path / "labels" / ("instances" if use_instances else "semantic")
        array_path, vs = ome_zarr_levels(group)[0]
        vs = VoxelSize.parse(voxel_size) if voxel_size is not None else vs
        array = ZarrVolume(array_path).read()
        offset = int(attrs.get("label_offset", 0))
        classes = None if use_instances else {k + offset: str(n) for k, n in enumerate(attrs.get("classes", []))}
        return Labels(array, classes, vs, voxel_size is not None or vs != UNKNOWN_VOXEL_SIZE, attrs.get("source"))
    volume = as_volume(spec, voxel_size)
    array = volume.read()
    if array.dtype.kind not in "iub":
        raise MeasureError(f"{spec}: holds {array.dtype} values; labels must be integers (class values or instance ids)")
    classes = None if instances else {int(v): str(int(v)) for v in np.unique(array) if v > 0}
    return Labels(array, classes, volume.voxel_size, bool(volume.voxel_size_known), None)


# -- command line -----------------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prediction", help="ssl-em predict output (OUT.zarr) or any label volume ssl_em reads")
    parser.add_argument("--out", required=True, help="CSV to write, one row per object (the summary goes to OUT_summary.csv beside it)")
    parser.add_argument("--classes", default=None, help="class names to measure, comma-separated (default: every class)")
    parser.add_argument("--instances", action="store_true", help="measure instance ids (labels/instances, or a volume of ids) rather than classes")
    parser.add_argument("--2d", dest="two_d", action="store_true", help="measure each z-slice on its own (areas, perimeters) rather than 3D objects")
    parser.add_argument("--image", default=None, help="raw image for mean_intensity (default: the one the prediction was made from, if it still exists)")
    parser.add_argument("--voxel-size", default=None, help="z,y,x nm (overrides the file's)")


def run(args) -> int:
    check_writable_file(args.out, "--out")  # before the work, not after it
    labels = open_labels(args.prediction, True if args.instances else None, args.voxel_size)
    if not labels.voxel_size_known:
        print(f"ssl-em measure: {args.prediction} records no voxel size: sizes are in voxels (1 nm each); --voxel-size z,y,x gives it")
    image = _open_image(args.image or labels.image, labels.array.shape, given=args.image is not None)
    mode = "2d" if args.two_d or labels.array.shape[0] == 1 else "3d"
    select = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    if select and labels.classes is None:
        raise MeasureError(f"--classes {args.classes}: instance ids have no classes; drop --classes or --instances")
    rows = measure(labels.array, labels.voxel_size.as_tuple(), labels.classes, image, mode, select)
    write_csv(args.out, rows, COLUMNS_3D if mode == "3d" else COLUMNS_2D)
    summary = summarize(rows)
    write_csv(summary_path(args.out), summary, tuple(summary[0]) if summary else ("class", "count"))
    vs = labels.voxel_size
    print(f"{len(rows)} objects ({mode}, voxel {vs.z:g} x {vs.y:g} x {vs.x:g} nm{'' if image is not None else ', no raw image: mean_intensity empty'})")
    for s in summary:
        print("  " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in s.items()))
    print(f"wrote {args.out} and {summary_path(args.out)}")
    return 0


def _open_image(spec: str | None, shape: tuple[int, ...], given: bool) -> Volume | None:
    """The raw image as a Volume of `shape`; None when the recorded one is gone (a note says so)."""
    from ssl_em.data.readers.open import as_volume

    if spec is None:
        return None
    if not given and not Path(spec.split(":/")[0]).exists():
        print(f"ssl-em measure: the prediction's image {spec} no longer exists: mean_intensity left empty (--image gives it)")
        return None
    volume = as_volume(spec)
    if tuple(volume.shape) != tuple(shape):
        raise MeasureError(f"--image {spec}: shape {tuple(volume.shape)} differs from the prediction's {tuple(shape)}")
    return volume
