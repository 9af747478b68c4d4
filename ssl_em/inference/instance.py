"""Instances from semantic predictions: boundary-aware targets and a seeded watershed.

Training: instance ids become three classes, background / boundary / interior
(`instance_targets`). Inference: foreground = 1 - p(background), boundary = p(boundary);
seeds are connected components of confident interior away from boundaries; a watershed
on the boundary map grows them inside the foreground; fragments smaller than
`min_size` are dropped and their pixels re-flooded from their neighbours (merged), or
removed when no neighbour reaches them. Works on 2D (y, x) and 3D (z, y, x) arrays
(scikit-image is n-dimensional); `segment_slices` does anisotropic stacks slice by slice.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.segmentation import find_boundaries, watershed

#: Class order of the instance task's semantic targets.
INSTANCE_CLASSES = ("background", "boundary", "interior")
BACKGROUND, BOUNDARY, INTERIOR = range(3)


def instance_targets(ids: np.ndarray, zero_is_boundary: bool = True) -> np.ndarray:
    """ids: (H, W) instance ids -> (H, W) int64 classes: 0 background, 1 boundary, 2 interior.

    The boundary is each instance's inner rim where it touches another id (or 0). With
    `zero_is_boundary` (dense neuron labels, where 0 is the membrane between cells) id 0 is
    boundary too; otherwise 0 is background (mitochondria in cytoplasm, say).
    """
    ids = np.asarray(ids)
    out = np.full(ids.shape, INTERIOR, np.int64)
    out[find_boundaries(ids, mode="inner") & (ids > 0)] = BOUNDARY
    out[ids == 0] = BOUNDARY if zero_is_boundary else BACKGROUND
    return out


def foreground_boundary(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """probs: (3, ...) class probabilities in INSTANCE_CLASSES order -> (foreground, boundary) maps."""
    return 1.0 - probs[BACKGROUND], probs[BOUNDARY]


def watershed_instances(
    foreground: np.ndarray,
    boundary: np.ndarray,
    seed_threshold: float = 0.5,
    foreground_threshold: float = 0.5,
    min_size: int = 16,
    merge_small: bool = True,
) -> np.ndarray:
    """Seeded watershed. foreground, boundary: (H, W) or (Z, Y, X) probabilities in [0, 1].

    Seeds: connected components of (foreground - boundary) > seed_threshold. Mask:
    foreground > foreground_threshold. Returns uint32 ids (0 = background), consecutive.
    """
    interior = (foreground - boundary) > seed_threshold
    seeds, _ = ndimage.label(interior)
    mask = foreground > foreground_threshold
    labels = watershed(boundary, markers=seeds, mask=mask | (seeds > 0))
    if min_size > 1:
        labels = remove_small_fragments(labels, boundary, mask, min_size, merge_small)
    return _consecutive(labels)


def remove_small_fragments(labels: np.ndarray, boundary: np.ndarray, mask: np.ndarray, min_size: int, merge: bool = True) -> np.ndarray:
    """Drop segments smaller than min_size voxels; with `merge`, their voxels go to whichever
    neighbouring segment the watershed on `boundary` reaches first (no new ids appear)."""
    sizes = np.bincount(labels.ravel())
    small = sizes < min_size
    small[0] = False
    if not small.any():
        return labels
    kept = np.where(small[labels], 0, labels)
    return watershed(boundary, markers=kept, mask=mask | (kept > 0)) if merge else kept


def segment_slices(foreground: np.ndarray, boundary: np.ndarray, **kwargs) -> np.ndarray:
    """(Z, Y, X) maps segmented slice by slice (anisotropic stacks); ids unique across slices."""
    out = np.zeros(foreground.shape, np.uint32)
    offset = 0
    for z in range(foreground.shape[0]):
        ids = watershed_instances(foreground[z], boundary[z], **kwargs)
        out[z] = np.where(ids > 0, ids + offset, 0)
        offset += int(ids.max())
    return out


def _consecutive(labels: np.ndarray) -> np.ndarray:
    ids, inverse = np.unique(labels, return_inverse=True)
    out = inverse.reshape(labels.shape).astype(np.uint32)
    return out if ids[0] == 0 else out + 1


# -- blockwise 3D: segments cut by a block boundary are joined again --------------------------


def plane_merges(a: np.ndarray, b: np.ndarray, min_fraction: float = 0.5) -> list[tuple[int, int]]:
    """Pairs (id in a, id in b) to join across the boundary between two adjacent planes.

    a, b: (H, W) instance ids on either side of a block boundary. A pair is joined when its
    overlap is more than `min_fraction` of each segment's area in its plane (mutual majority):
    a neuron cut by the boundary continues almost pixel for pixel, while two neighbours
    that touch it only share a sliver."""
    both = (a > 0) & (b > 0)
    if not both.any():
        return []
    pairs, counts = np.unique(np.stack([a[both], b[both]]).astype(np.int64), axis=1, return_counts=True)
    ids_a, area_a = np.unique(a[a > 0], return_counts=True)
    ids_b, area_b = np.unique(b[b > 0], return_counts=True)
    size_a = area_a[np.searchsorted(ids_a, pairs[0])]
    size_b = area_b[np.searchsorted(ids_b, pairs[1])]
    keep = (counts > min_fraction * size_a) & (counts > min_fraction * size_b)
    return [(int(x), int(y)) for x, y in pairs[:, keep].T]


def merge_map(pairs: list[tuple[int, int]]) -> dict[int, int]:
    """Union-find over joined pairs: id -> the smallest id of its group (ids in no pair are
    left out). Mapping twice gives the same result, so relabelling can be resumed."""
    parent: dict[int, int] = {}

    def root(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for x, y in pairs:
        rx, ry = root(x), root(y)
        if rx != ry:
            parent[max(rx, ry)] = min(rx, ry)
    return {x: root(x) for x in parent if root(x) != x}


def relabel(ids: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    """ids with every key of `mapping` replaced by its value."""
    if not mapping:
        return ids
    uniq, inverse = np.unique(ids, return_inverse=True)
    return np.array([mapping.get(int(u), int(u)) for u in uniq], ids.dtype)[inverse].reshape(ids.shape)
