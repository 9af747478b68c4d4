"""Sliding-window prediction of 2D planes: overlapping windows, blended on the device.

Each plane is cut into overlapping windows; window logits become probabilities that are
blended with a smooth weight (a raised-cosine ramp over the overlap, never zero), so the
result is the weighted mean of every window covering a pixel and shows no seams.
`ssl_em.inference.predict` runs it slab by slab over a whole volume; fine-tuning scores its
held-out slices and the napari widget predicts an image with the same function.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

from ssl_em.precision import FLOAT32, Precision, choose


def window_starts(n: int, window: int, stride: int) -> list[int]:
    """Window offsets covering [0, n): regular steps, the last one flush with the end."""
    if n <= window:
        return [0]
    starts = list(range(0, n - window, stride))
    return starts + [n - window]


def blend_weights(window: int, overlap: int) -> np.ndarray:
    """(window, window) weights: 1 in the middle, a raised-cosine ramp over `overlap` px at
    each edge, strictly positive so image borders (covered by one window) stay defined."""
    w = np.ones(window, np.float32)
    if overlap > 0:
        ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(overlap) + 0.5) / overlap)
        w[:overlap] = np.minimum(w[:overlap], ramp)
        w[-overlap:] = np.minimum(w[-overlap:], ramp[::-1])
    return np.outer(w, w)


def default_precision(device: torch.device) -> Precision:
    """What runs when the caller passes no precision: plain float32 on a CPU (the reference the
    tests compare against), `ssl_em.precision.choose`'s pick on a GPU. The CLIs always pass
    their own choice (`choose`, or the --precision flag)."""
    return choose(device.type) if device.type == "cuda" else FLOAT32


@functools.lru_cache(maxsize=8)
def _blend_norm(Hp: int, Wp: int, window: int, overlap: int) -> np.ndarray:
    """(Hp, Wp) sum of the blend weights of every window covering each pixel, added window by
    window in the order the windows run (the same float32 sums as adding them on the fly)."""
    stride, weight = max(1, window - overlap), blend_weights(window, overlap)
    norm = np.zeros((Hp, Wp), np.float32)
    for y in window_starts(Hp, window, stride):
        for x in window_starts(Wp, window, stride):
            norm[y : y + window, x : x + window] += weight
    norm.flags.writeable = False
    return norm


@torch.no_grad()
def predict_planes(net: nn.Module, images: np.ndarray, window: int, overlap: int, batch_size: int = 4, device: str | torch.device = "cpu", precision: Precision | None = None) -> np.ndarray:
    """images: (n, H, W) standardised planes -> (K, n, H, W) float32 class probabilities.

    Each plane is cut into the same windows as `predict_plane`; the windows of all n planes
    run together in batches of `batch_size` (full batches across plane boundaries), in one
    autocast region at `precision` (None: `default_precision`), so bf16 weights are cast once
    per call rather than once per batch. Per batch: one gather of the windows, one forward,
    one index_add of the weighted probabilities; nothing per window on the host. The blend
    normaliser depends only on the plane's size and is computed once per size (`_blend_norm`)."""
    device = torch.device(device)
    precision = precision or default_precision(device)
    n, H, W = images.shape
    Hp, Wp = max(H, window), max(W, window)
    if (Hp, Wp) != (H, W):
        images = np.pad(images, ((0, 0), (0, Hp - H), (0, Wp - W)), mode="reflect" if min(H, W) > 1 else "edge")
    stride = max(1, window - overlap)
    ys, xs = torch.tensor(window_starts(Hp, window, stride)), torch.tensor(window_starts(Wp, window, stride))
    # Flat offset of every window's corner in the (n, Hp, Wp) stack, plane by plane, rows first.
    corners = ((torch.arange(n)[:, None, None] * Hp + ys[None, :, None]) * Wp + xs[None, None, :]).reshape(-1).to(device)
    r = torch.arange(window, device=device)
    local = (r[:, None] * Wp + r[None, :]).reshape(-1)  # (w*w,) offsets inside a window
    weight = torch.from_numpy(blend_weights(window, overlap)).to(device)
    src = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(device).reshape(-1)
    acc = None
    with precision.autocast(device):
        for i in range(0, len(corners), batch_size):
            idx = corners[i : i + batch_size, None] + local  # (b, w*w)
            logits = net(src[idx].view(-1, 1, window, window))
            probs = logits.float().softmax(1) * weight  # (b, K, w, w)
            K = probs.shape[1]
            if acc is None:
                acc = torch.zeros(K, n * Hp * Wp, device=device)
            acc.index_add_(1, idx.reshape(-1), probs.permute(1, 0, 2, 3).reshape(K, -1))
    norm = torch.from_numpy(_blend_norm(Hp, Wp, window, overlap).copy()).to(device)
    return (acc.view(-1, n, Hp, Wp) / norm)[:, :, :H, :W].cpu().numpy()


def predict_plane(net: nn.Module, image: np.ndarray, window: int, overlap: int, batch_size: int = 4, device: str | torch.device = "cpu", precision: Precision | None = None) -> np.ndarray:
    """image: (H, W) standardised float32 -> (K, H, W) float32 class probabilities.

    Images smaller than the window are reflect-padded; windows are batched, run at
    `precision` (autocast; None: `default_precision`), and blended on the device with one
    index_add per batch (`predict_planes` with one plane)."""
    return predict_planes(net, image[None], window, overlap, batch_size, device, precision)[:, 0]
