"""Reconstruction previews of masked-modeling methods (MAE, SparK): a small image grid of
(input, masked input, reconstruction) rows, to the run's logger every N steps and at the
last step.

Where a grid goes: to the logger when it takes images (`log_image`: Weights & Biases, the
default logger), else to `reconstructions/stepXXXXXXXX.png` in the logger's folder (the
run folder for the CSV logger). Rank 0 alone draws and writes: one writer per artefact.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

#: Column headers of the reconstruction grid, left to right.
RECONSTRUCTION_COLUMNS = ("input", "masked input", "reconstruction")


def reconstruction_grid(imgs: torch.Tensor, masked: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """imgs, masked, recon: (n, C, H, W) -> (C, H', W') in [0, 1]: one row per tile (input,
    masked input, reconstruction), one intensity scale for the whole grid (the inputs'
    range), headers above the columns."""
    from torchvision.utils import make_grid

    rows = torch.stack([imgs, masked, recon], dim=1).flatten(0, 1).float()  # (3n, C, H, W)
    lo, hi = imgs.float().amin(), imgs.float().amax()
    grid = make_grid(((rows - lo) / (hi - lo + 1e-6)).clamp(0, 1), nrow=3, padding=2, pad_value=1.0)
    return with_column_headers(grid, RECONSTRUCTION_COLUMNS, imgs.shape[-1] + 2)


def with_column_headers(grid: torch.Tensor, headers: tuple[str, ...], column_px: int, height: int = 14) -> torch.Tensor:
    """grid: (C, H, W) in [0, 1] -> (C, height + k H, k W), each header written above its
    column (dark text on white, Pillow's default font), so a saved PNG says what each column
    is. Columns too narrow for their header are enlarged k-fold (nearest neighbour) first."""
    from PIL import Image, ImageDraw

    k = max(1, math.ceil((6 * max(map(len, headers)) + 6) / column_px))
    if k > 1:
        grid, column_px = F.interpolate(grid[None], scale_factor=k, mode="nearest")[0], column_px * k
    C, H, W = grid.shape
    strip = Image.new("L", (W, height), 255)
    draw = ImageDraw.Draw(strip)
    for col, text in enumerate(headers):
        draw.text((col * column_px + 3, 1), text, fill=0)
    head = torch.from_numpy(np.asarray(strip, np.float32) / 255.0).expand(C, height, W)
    return torch.cat([head.to(grid), grid], dim=1)


@torch.no_grad()
def log_image_grid(module, grid: torch.Tensor, name: str = "train/reconstruction") -> Path | None:
    """Send grid (C, H, W) in [0, 1] to `module`'s logger if it takes images, else write it
    as a PNG in the logger's folder (or the trainer's root folder); rank 0 only. Returns the
    PNG written, if any."""
    trainer = module.trainer
    if not trainer.is_global_zero:
        return None
    grid = grid.detach().float().cpu()
    caption = f"step {module.global_step}: " + " | ".join(RECONSTRUCTION_COLUMNS)
    logger = module.logger
    if hasattr(logger, "log_image"):
        # uint8 (H, W, C) as it will be stored: wandb casts a float array to uint8
        # without scaling, which turns a [0, 1] grid black.
        pixels = (grid * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        logger.log_image(name, images=[pixels], caption=[caption], step=module.global_step)
        return None
    from torchvision.utils import save_image

    # Not trainer.log_dir: it broadcasts, and only rank 0 is here.
    out = Path(getattr(logger, "log_dir", None) or trainer.default_root_dir) / "reconstructions"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"step{module.global_step:08d}.png"
    save_image(grid, path)
    return path


class Previews:
    """When a method draws its grid: at every `every`-th optimizer step (0: never) and once
    more at the run's end if the last step was not one of them. The method calls `step`
    from training_step with the batch's tensors and `end` from on_train_end; `draw(*tensors)`
    returns the grid. Only the first `n` tiles are kept, detached."""

    def __init__(self, every: int, draw, n: int = 8) -> None:
        self.every, self.draw, self.n = every, draw, n
        self._last: tuple[torch.Tensor, ...] | None = None

    def step(self, module, *tensors: torch.Tensor) -> None:
        if not self.every:
            return
        self._last = tuple(t[: self.n].detach() for t in tensors)
        if module.global_step % self.every == 0:
            log_image_grid(module, self.draw(*self._last))

    def end(self, module) -> None:
        if self._last is not None and (module.global_step - 1) % self.every != 0:  # not just drawn
            log_image_grid(module, self.draw(*self._last))
