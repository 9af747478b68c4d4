"""The built-in default: a small synthetic EM volume with matching labels.

Cells are a warped 3D Voronoi tessellation separated by dark membranes; mitochondria are
dark ellipsoids with lighter cristae stripes; vesicles are small dark rings; everything is
blurred and given shot-like noise, like a low-dose EM image. The labels match the image
exactly. It exists for demos and fast tests and is no substitute for real EM.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

#: Semantic classes of the synthetic volume.
CLASSES = ("cytoplasm", "membrane", "mitochondrion")


@dataclass
class SyntheticEM:
    """image: (z, y, x) uint8; semantic: (z, y, x) uint8 in CLASSES order;
    cells: (z, y, x) uint32 cell ids, 0 on membranes; mitochondria: (z, y, x) uint32 ids."""

    image: np.ndarray
    semantic: np.ndarray
    cells: np.ndarray
    mitochondria: np.ndarray
    voxel_size: tuple[float, float, float]


def _smooth_noise(shape, sigma, rng) -> np.ndarray:
    """Zero-mean, unit-std smooth random field (sigma in voxels, per axis)."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return f / (f.std() + 1e-8)


def make_volume(
    shape: tuple[int, int, int] = (32, 256, 256),
    voxel_size: tuple[float, float, float] = (8.0, 8.0, 8.0),
    cell_size: float = 48.0,
    membrane_width: float = 2.0,
    mito_per_cell: float = 1.5,
    vesicle_density: float = 4e-5,
    noise: float = 0.12,
    seed: int = 0,
) -> SyntheticEM:
    """Generate a volume. cell_size and widths are in xy pixels; z is scaled by the
    voxel anisotropy so cells stay round in physical space."""
    rng = np.random.default_rng(seed)
    Z, Y, X = shape
    aniso = voxel_size[0] / voxel_size[1]
    zz, yy, xx = np.meshgrid(np.arange(Z) * aniso, np.arange(Y), np.arange(X), indexing="ij")
    # Domain warping makes Voronoi walls wavy like real membranes.
    warp = cell_size * 0.12
    sig = (max(cell_size / 4 / aniso, 1), cell_size / 4, cell_size / 4)
    coords = np.stack([zz + warp * _smooth_noise(shape, sig, rng) * (Z > 1), yy + warp * _smooth_noise(shape, sig, rng), xx + warp * _smooth_noise(shape, sig, rng)], -1)

    extent = np.array([Z * aniso, Y, X], dtype=np.float64)
    n_cells = max(2, int(np.prod(np.maximum(extent, cell_size)) / cell_size**3 * 1.3))
    seeds = rng.uniform(0, 1, (n_cells, 3)) * extent
    dist, idx = cKDTree(seeds).query(coords.reshape(-1, 3), k=2, workers=-1)
    # Distance to the Voronoi wall between the two nearest seeds: half the difference of
    # squared distances over the seed spacing.
    s1, s2 = seeds[idx[:, 0]], seeds[idx[:, 1]]
    wall = (dist[:, 1] ** 2 - dist[:, 0] ** 2) / (2 * np.linalg.norm(s2 - s1, axis=1) + 1e-8)
    wall = wall.reshape(shape)
    cell_id = (idx[:, 0] + 1).reshape(shape).astype(np.uint32)
    membrane = wall < membrane_width / 2

    # Mitochondria: ellipsoids placed inside cells, clear of membranes.
    mito = np.zeros(shape, np.uint32)
    n_mito = rng.poisson(mito_per_cell * n_cells)
    for m in range(1, n_mito + 1):
        c = seeds[rng.integers(n_cells)] + rng.normal(0, cell_size / 6, 3)
        axes = np.array([rng.uniform(5, 9), rng.uniform(5, 8), rng.uniform(10, 22)])
        rot = _random_rotation(rng)
        d = (coords - c) @ rot.T / axes
        inside = (d**2).sum(-1) < 1
        inside &= wall > membrane_width * 1.5
        mito[inside & (mito == 0)] = m
    # Vesicles: small rings (hollow spheres) in the cytoplasm.
    n_ves = rng.poisson(vesicle_density * np.prod(shape) * max(1, aniso))
    ves = np.zeros(shape, bool)
    if n_ves:
        cv = rng.uniform(0, 1, (n_ves, 3)) * extent
        r = rng.uniform(2.0, 3.5, n_ves)
        dv, iv = cKDTree(cv).query(np.stack([zz, yy, xx], -1).reshape(-1, 3), k=1, workers=-1)
        shell = np.abs(dv - r[iv]) < 0.8
        ves = shell.reshape(shape) & ~membrane & (mito == 0)

    # Intensities (0 dark .. 1 bright, as in EM with stained membranes).
    img = 0.62 + 0.05 * _smooth_noise(shape, (1, 6, 6), rng) + 0.04 * rng.uniform(-1, 1, n_cells + 1)[cell_id]
    img[membrane] = 0.18
    cristae = 0.5 + 0.5 * np.sin((coords[..., 2] + coords[..., 1]) * 0.9 + 3 * _smooth_noise(shape, (1, 3, 3), rng))
    img = np.where(mito > 0, 0.30 + 0.12 * cristae, img)
    img[ves] = 0.30
    img = ndimage.gaussian_filter(img.astype(np.float32), (0.3 if Z > 1 else 0, 1.0, 1.0))
    img += noise * rng.standard_normal(shape).astype(np.float32) * np.sqrt(np.clip(img, 0.05, 1))
    image = np.clip(img * 255, 0, 255).astype(np.uint8)

    semantic = np.zeros(shape, np.uint8)
    semantic[membrane] = 1
    semantic[mito > 0] = 2
    cells = np.where(membrane, 0, cell_id).astype(np.uint32)
    cells = _relabel(cells)
    return SyntheticEM(image=image, semantic=semantic, cells=cells, mitochondria=_relabel(mito), voxel_size=tuple(voxel_size))


def _random_rotation(rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Consecutive ids 1..N (0 stays 0)."""
    ids, inv = np.unique(labels, return_inverse=True)
    out = inv.reshape(labels.shape).astype(np.uint32)
    return out if ids[0] == 0 else out + 1


def write(out: str | Path, em: SyntheticEM) -> dict[str, Path]:
    """Write image and labels as multi-page TIFFs (readable by every EM tool)."""
    import tifffile

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for key in ("image", "semantic", "cells", "mitochondria"):
        paths[key] = out / f"{key}.tif"
        tifffile.imwrite(paths[key], getattr(em, key), metadata={"axes": "ZYX"}, imagej=False)
    (out / "voxel_size.txt").write_text(",".join(f"{v:g}" for v in em.voxel_size) + "\n")
    return paths


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder for image.tif, semantic.tif, cells.tif, mitochondria.tif")
    parser.add_argument("--shape", default="32,256,256", help="z,y,x (default 32,256,256)")
    parser.add_argument("--seed", type=int, default=0)


#: make_volume holds a few float copies of the volume in memory: 2^28 voxels is ~10 GB of it.
MAX_VOXELS = 1 << 28


def parse_shape(text: str) -> tuple[int, int, int]:
    """"z,y,x" -> three sizes >= 1 whose product fits in memory; UserError naming --shape."""
    from ssl_em.errors import UserError

    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise UserError(f"--shape {text}: give three sizes >= 1, z,y,x (e.g. 32,256,256)")
    if shape[0] * shape[1] * shape[2] > MAX_VOXELS:
        raise UserError(f"--shape {text}: {shape[0] * shape[1] * shape[2]:.3g} voxels; synthetic volumes are built in memory, at most {MAX_VOXELS:.3g}")
    return shape


def run(args) -> int:
    shape = parse_shape(args.shape)
    em = make_volume(shape=shape, seed=args.seed)
    for key, path in write(args.out, em).items():
        print(f"{key:13s} {path}")
    return 0
