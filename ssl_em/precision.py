"""Which numeric precision and memory layout a run uses: decided here, once, for every stage.

bf16 autocast pays where the hardware has bf16 matrix units: every recent NVIDIA GPU, and
CPUs with AVX512-BF16 or AMX-BF16 (recent EPYC and Xeon). Elsewhere bf16 is emulated and
slower than float32, so float32 stays. channels_last (NHWC) pays for convolutions under bf16
on those CPUs (oneDNN's fast kernels are NHWC) and costs a layout conversion otherwise; a ViT
has no 4-D activations to lay out. On the one bf16 CPU measured (AMD EPYC, AVX512-BF16, no
AMX) bf16 gave 1.44x on ResNet-18 training steps and channels_last nothing more (0.95-1.04x),
so on CPUs it stays off; on GPUs it is on for CNNs, as tensor cores want. The measurements
behind these choices are in benchmarks/RESULTS.md ("Issue 17 (session 7)" and "Issue 21");
a user overrides either with a flag.

Shapes: none; this module only names settings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

#: Lightning's names for the two precisions ssl_em chooses between.
BF16, FP32 = "bf16-mixed", "32-true"


@dataclass(frozen=True)
class Precision:
    """A run's numeric settings: `lightning` is a Lightning precision string; `channels_last`
    lays 4-D weights and activations out as NHWC; `why` is the one line the CLI prints."""

    lightning: str
    channels_last: bool
    why: str

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype to autocast to, or None for plain float32."""
        return torch.bfloat16 if self.lightning.startswith("bf16") else None

    def autocast(self, device: torch.device | str):
        """A context manager running the forward at this precision on `device`."""
        dev = torch.device(device)
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.autocast_dtype is not None)

    def apply(self, module: nn.Module) -> nn.Module:
        """Lay the module's 4-D weights out as channels_last when chosen; returns it."""
        return module.to(memory_format=torch.channels_last) if self.channels_last else module


def cpu_has_bf16_units() -> bool:
    """True on a CPU with native bf16 dot products (AVX512-BF16 or AMX-BF16)."""
    caps = getattr(torch.cpu, "get_capabilities", lambda: {})()
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def has_convolutions(module: nn.Module | None) -> bool:
    return module is not None and any(isinstance(m, nn.Conv2d) and m.kernel_size != m.stride for m in module.modules())


def device_of(accelerator: str | None) -> str:
    """choose()'s device for Lightning's accelerator name ("cpu", "gpu", "cuda", "auto", None)."""
    accel = str(accelerator or "auto")
    return "cpu" if accel == "cpu" else ("cuda" if accel in ("gpu", "cuda") else "auto")


#: What library functions run at when no precision is passed on a CPU: plain float32, the
#: reference every test compares against. The CLIs pass `choose(...)` instead.
FLOAT32 = Precision(FP32, False, f"{FP32}, contiguous: float32 reference")


def choose(device: str = "auto", requested: str | None = None, channels_last: bool | None = None, model: nn.Module | None = None) -> Precision:
    """Pick precision and layout for `device` ("cpu", "cuda", "gpu" or "auto": CUDA when there is
    one). `requested` (a Lightning precision string) and `channels_last` override the choice;
    channels_last defaults to on for bf16 on a GPU with a model with real convolutions (a ViT's
    patch embedding, kernel == stride, does not count) and off otherwise."""
    cuda = device in ("cuda", "gpu") or (device == "auto" and torch.cuda.is_available())
    if requested is not None:
        lightning, why = str(requested), "as requested"
    elif cuda and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        lightning, why = BF16, "the GPU has bf16 units"
    elif not cuda and cpu_has_bf16_units():
        lightning, why = BF16, "the CPU has bf16 units (AVX512-BF16/AMX)"
    else:
        lightning, why = FP32, "no bf16 units on this device"
    bf16 = lightning.startswith("bf16")
    if channels_last is None:
        channels_last = bf16 and cuda and has_convolutions(model)
        layout = "channels_last (convolutions under bf16 on a GPU)" if channels_last else "contiguous"
    else:
        layout = "channels_last (as requested)" if channels_last else "contiguous (as requested)"
    return Precision(lightning, bool(channels_last), f"{lightning}, {layout}: {why}")
