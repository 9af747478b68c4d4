"""Network layers shared by pretraining and fine-tuning (SparK's decoder and the U-Net head).

Shapes: x (B, C, H, W) in, (B, C_out, H, W) out.
"""

from __future__ import annotations

from torch import nn


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """Two 3x3 conv + BatchNorm + ReLU. BatchNorm (not GroupNorm) keeps inference local:
    a pixel's output does not depend on the rest of the tile, so sliding windows blend exactly."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
    )  # fmt: skip
