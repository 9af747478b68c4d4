"""EM augmentations as batched torch modules, so they run on the GPU after transfer.

Every module takes a float batch x: (B, C, H, W) (or (B, C, D, H, W) for the section
artefacts) and draws independent parameters for each sample from its own generator on x's
device (`ssl_em.seeding.Generators`), seeded from (run seed, module, rank, loader worker):
a seed repeats a run, and every GPU draws different views. Two instances of one class share
a stream unless given different `stream` names. Each has a probability `p` of acting on a
given sample. A pretraining view is an `nn.Sequential` of them.

Intensity augmentations assume standardised input (about zero mean, unit std, as the
stream delivers); those that need a [0, 1] range (gamma) rescale each sample to its own
range and back.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ssl_em.seeding import Generators


class RandomModule(nn.Module):
    """An augmentation with its own random stream (named after its class by default)."""

    def __init__(self, stream: str | None = None) -> None:
        super().__init__()
        self.rng = Generators(stream or type(self).__name__)

    def rand(self, x: torch.Tensor, *shape: int) -> torch.Tensor:
        """U[0, 1) of `shape` (default (B,)) on x's device."""
        return torch.rand(shape or (x.shape[0],), device=x.device, generator=self.rng.get(x.device))

    def uniform(self, x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        """(B,) uniform in [lo, hi)."""
        return lo + (hi - lo) * self.rand(x)

    def chance(self, x: torch.Tensor, p: float) -> torch.Tensor:
        """(B,) bool: which samples an augmentation acts on."""
        return self.rand(x) < p

    def randint(self, x: torch.Tensor, lo: int, hi: int, n: int) -> torch.Tensor:
        """(n,) integers in [lo, hi) on x's device."""
        return torch.randint(lo, hi, (n,), device=x.device, generator=self.rng.get(x.device))


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) to broadcast against x."""
    return v.view((-1,) + (1,) * (x.ndim - 1))


class FlipRot90(RandomModule):
    """Random element of the dihedral group on the last two axes: flips and 90° rotations.

    EM has no preferred orientation in-plane, so all 8 are equally valid.
    Transposition (hence odd rotations) needs square tiles and is skipped otherwise.
    """

    def __init__(self, p: float = 1.0, stream: str | None = None) -> None:
        super().__init__(stream)
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.chance(x, self.p)
        for op in (lambda t: t.flip(-1), lambda t: t.flip(-2)) + ((lambda t: t.transpose(-1, -2)),) * (x.shape[-1] == x.shape[-2]):
            m = _bcast(act & self.chance(x, 0.5), x)
            x = torch.where(m, op(x), x)
        return x


class BrightnessContrast(RandomModule):
    """x * c + b with c ~ U(1 - contrast, 1 + contrast), b ~ U(-brightness, brightness) (in std units)."""

    def __init__(self, brightness: float = 0.2, contrast: float = 0.2, p: float = 0.8, stream: str | None = None) -> None:
        super().__init__(stream)
        self.brightness, self.contrast, self.p = brightness, contrast, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = _bcast(self.chance(x, self.p).to(x.dtype), x)
        c = 1 + self.uniform(x, -self.contrast, self.contrast)
        b = self.uniform(x, -self.brightness, self.brightness)
        mean = x.mean(dim=tuple(range(1, x.ndim)), keepdim=True)
        y = (x - mean) * _bcast(c, x) + mean + _bcast(b, x)
        return act * y + (1 - act) * x


class Gamma(RandomModule):
    """Gamma correction with gamma ~ logU(1/max_gamma, max_gamma), on each sample's own range."""

    def __init__(self, max_gamma: float = 1.5, p: float = 0.5, stream: str | None = None) -> None:
        super().__init__(stream)
        self.max_gamma, self.p = max_gamma, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(1, x.ndim))
        lo, hi = x.amin(dims, keepdim=True), x.amax(dims, keepdim=True)
        u = ((x - lo) / (hi - lo + 1e-6)).clamp(0, 1)
        g = torch.exp(self.uniform(x, -math.log(self.max_gamma), math.log(self.max_gamma)))
        y = u ** _bcast(g.to(x.dtype), x) * (hi - lo) + lo
        return torch.where(_bcast(self.chance(x, self.p), x), y, x)


class GaussianBlur(RandomModule):
    """Separable Gaussian blur with sigma ~ U(sigma) pixels per sample (defocus, thick sections)."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0), p: float = 0.5, stream: str | None = None) -> None:
        super().__init__(stream)
        self.sigma, self.p = sigma, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        radius = int(math.ceil(3 * self.sigma[1]))
        s = self.uniform(x, *self.sigma)
        t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
        k = torch.exp(-(t[None] ** 2) / (2 * s[:, None] ** 2))
        k = (k / k.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (B*C, K)
        # Grouped convolution: one kernel per (sample, channel).
        y = x.reshape(1, B * C, H, W)
        y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), k[:, None, None, :], groups=B * C)
        y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k[:, None, :, None], groups=B * C)
        return torch.where(_bcast(self.chance(x, self.p), x), y.view(B, C, H, W), x)


class GaussianNoise(RandomModule):
    """Additive noise with std ~ U(0, std) (in units of the standardised signal): shot/detector noise."""

    def __init__(self, std: float = 0.1, p: float = 0.5, stream: str | None = None) -> None:
        super().__init__(stream)
        self.std, self.p = std, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.rand(x) * self.std * self.chance(x, self.p)
        noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=self.rng.get(x.device))
        return x + noise * _bcast(s.to(x.dtype), x)


class RandomResizedCrop(RandomModule):
    """Crop a random area fraction in `scale` with aspect ratio in `ratio`, resized to `size`.

    Done for the whole batch at once with an affine grid, so it costs one grid_sample.
    """

    def __init__(self, size: int, scale: tuple[float, float] = (0.25, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3), stream: str | None = None) -> None:
        super().__init__(stream)
        self.size, self.scale, self.ratio = size, scale, ratio

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        dev = x.device
        area = self.uniform(x, *self.scale)
        r = torch.exp(self.uniform(x, math.log(self.ratio[0]), math.log(self.ratio[1])))
        w = torch.sqrt(area * r).clamp(max=1.0)  # fraction of width
        h = torch.sqrt(area / r).clamp(max=1.0)
        cx = self.uniform(x, -1, 1) * (1 - w)
        cy = self.uniform(x, -1, 1) * (1 - h)
        theta = torch.zeros(B, 2, 3, device=dev, dtype=x.dtype)
        theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w, cx, h, cy
        grid = F.affine_grid(theta, (B, x.shape[1], self.size, self.size), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


class Stripes(RandomModule):
    """Thin straight bright or dark lines at a random angle: knife marks, scratches, charging streaks."""

    def __init__(self, max_lines: int = 3, width: tuple[float, float] = (0.5, 2.0), strength: float = 1.5, p: float = 0.2, stream: str | None = None) -> None:
        super().__init__(stream)
        self.max_lines, self.width, self.strength, self.p = max_lines, width, strength, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        dev = x.device
        yy, xx = torch.meshgrid(torch.arange(H, device=dev, dtype=x.dtype), torch.arange(W, device=dev, dtype=x.dtype), indexing="ij")
        out = x
        act = self.chance(x, self.p)
        for _ in range(self.max_lines):
            ang = self.uniform(x, 0, math.pi)
            off = self.uniform(x, -(H + W) / 2, (H + W) / 2)
            wid = self.uniform(x, *self.width)
            amp = self.uniform(x, -self.strength, self.strength) * act * self.chance(x, 0.6)
            # Signed distance of every pixel to the line through the centre, shifted by off.
            d = (xx - W / 2)[None] * torch.cos(ang)[:, None, None] + (yy - H / 2)[None] * torch.sin(ang)[:, None, None] - off[:, None, None]
            line = torch.exp(-(d**2) / (2 * wid[:, None, None] ** 2))
            out = out + (amp[:, None, None] * line)[:, None]
        return out


def _one_section(aug: RandomModule, x: torch.Tensor, p: float) -> torch.Tensor:
    """(B, 1, D, 1, 1) bool: one random z-section per sample, each sample with chance p."""
    B, _, D = x.shape[:3]
    z = aug.randint(x, 0, D, B)
    m = (torch.arange(D, device=x.device)[None] == z[:, None]) & aug.chance(x, p)[:, None]
    return m[:, None, :, None, None]


class MissingSection(RandomModule):
    """3D: replace one random z-section by a constant (lost or torn section). x: (B, C, D, H, W)."""

    def __init__(self, value: float = 0.0, p: float = 0.3, stream: str | None = None) -> None:
        super().__init__(stream)
        self.value, self.p = value, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(_one_section(self, x, self.p), torch.full_like(x, self.value), x)


class DarkSection(RandomModule):
    """3D: darken one random z-section by a factor (uneven staining, thick section). x: (B, C, D, H, W)."""

    def __init__(self, shift: tuple[float, float] = (0.5, 1.5), p: float = 0.3, stream: str | None = None) -> None:
        super().__init__(stream)
        self.shift, self.p = shift, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = _one_section(self, x, self.p)
        s = self.uniform(x, *self.shift)
        return x - m * s.view(-1, 1, 1, 1, 1)


class Misalignment(RandomModule):
    """3D: shift all sections from a random z onwards by up to `max_shift` px (serial-section misalignment)."""

    def __init__(self, max_shift: int = 8, p: float = 0.3, stream: str | None = None) -> None:
        super().__init__(stream)
        self.max_shift, self.p = max_shift, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        act = self.chance(x, self.p).tolist()
        D = x.shape[2]
        cpu = x.new_empty(0, device="cpu")  # the per-sample draws are host ints
        for b, on in enumerate(act):
            if not on or D < 2:
                continue
            z = int(self.randint(cpu, 1, D, 1))
            dy, dx = (int(v) for v in self.randint(cpu, -self.max_shift, self.max_shift + 1, 2))
            out[b, :, z:] = torch.roll(x[b, :, z:], shifts=(dy, dx), dims=(-2, -1))
        return out


def em_view(size: int, crop_scale: tuple[float, float] = (0.25, 1.0), blur: float = 0.5, noise: float = 0.5, stream: str | None = None) -> nn.Sequential:
    """A typical contrastive view for 2D EM tiles: crop, dihedral, intensity, blur/noise, artefacts.

    `stream` prefixes every module's random stream: two views built with the same (or no)
    prefix draw identical numbers at a given step, so views built separately (multi-crop's
    global and local views) need different prefixes; one view called twice draws anew."""
    name = (lambda cls: f"{stream}.{cls.__name__}") if stream else (lambda cls: None)
    return nn.Sequential(
        RandomResizedCrop(size, scale=crop_scale, stream=name(RandomResizedCrop)),
        FlipRot90(stream=name(FlipRot90)),
        BrightnessContrast(p=0.8, stream=name(BrightnessContrast)),
        Gamma(p=0.5, stream=name(Gamma)),
        GaussianBlur(p=blur, stream=name(GaussianBlur)),
        GaussianNoise(p=noise, stream=name(GaussianNoise)),
        Stripes(p=0.1, stream=name(Stripes)),
    )


class RandomWarp(RandomModule):
    """Small affine plus elastic deformation of an image and its label map together.

    Tissue in EM is soft: sections stretch, shear and wrinkle a little, so labels must follow
    the same warp. Per sample (with chance p): rotation within ±`rotate` degrees, scale
    within 1 ± `scale`, shear within ±`shear`, plus a smooth random displacement field
    (`elastic` pixels at most, on a coarse `grid` x `grid` lattice upsampled bicubically).
    The image is resampled bilinearly with reflection at the borders, the labels by
    nearest neighbour; label pixels that come from outside the tile become `ignore_index`.

    image: (B, C, H, W) float; target: (B, H, W) int64. Returns both, same shapes.
    """

    def __init__(self, rotate: float = 15.0, scale: float = 0.1, shear: float = 0.05, elastic: float = 4.0, grid: int = 4,
                 p: float = 0.5, ignore_index: int = -1, stream: str | None = None) -> None:  # fmt: skip
        super().__init__(stream)
        self.rotate, self.scale, self.shear, self.elastic, self.grid, self.p, self.ignore_index = rotate, scale, shear, elastic, grid, p, ignore_index

    def forward(self, image: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, _, H, W = image.shape
        dev, dt = image.device, image.dtype
        u = lambda: self.rand(image).to(dt) * 2 - 1  # noqa: E731
        a = u() * math.radians(self.rotate)
        s = 1 + u() * self.scale
        sh = u() * self.shear
        theta = torch.zeros(B, 2, 3, device=dev, dtype=dt)
        theta[:, 0, 0], theta[:, 0, 1] = torch.cos(a) / s, -torch.sin(a) / s + sh
        theta[:, 1, 0], theta[:, 1, 1] = torch.sin(a) / s, torch.cos(a) / s
        grid = F.affine_grid(theta, (B, 1, H, W), align_corners=False)  # (B, H, W, 2) in [-1, 1]
        if self.elastic > 0:
            coarse = torch.randn(B, 2, self.grid, self.grid, device=dev, generator=self.rng.get(dev)).to(dt)
            coarse = coarse / coarse.abs().amax((1, 2, 3), keepdim=True).clamp(min=1e-6)  # at most 1, then scaled to pixels
            field = F.interpolate(coarse, size=(H, W), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
            grid = grid + field * self.elastic * 2 / torch.tensor([W, H], device=dev, dtype=dt)
        act = self.chance(image, self.p)
        identity = F.affine_grid(torch.eye(2, 3, device=dev, dtype=dt).expand(B, 2, 3), (B, 1, H, W), align_corners=False)
        grid = torch.where(act[:, None, None, None], grid, identity)
        warped = F.grid_sample(image, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        t = F.grid_sample(target.to(dt)[:, None], grid, mode="nearest", padding_mode="border", align_corners=False)[:, 0].round().long()
        inside = (grid.abs() <= 1).all(-1)  # (B, H, W): sampled from within the tile
        return warped, torch.where(inside, t, torch.full_like(t, self.ignore_index))
