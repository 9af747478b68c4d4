"""`ssl-em export-model MODEL --format bioimageio --sample VOLUME --out DIR`: a fine-tuned
model as a bioimage.io model (spec format 0.5), runnable in ilastik, deepImageJ, QuPath or
bioimageio.core without ssl_em's code for its TorchScript weights::

    DIR/
      bioimageio.yaml          the model description (format 0.5)
      weights_torchscript.pt   the traced network, softmax included: probabilities out
      weights.pt               the same weights as a state dict (torch.save of tensors only),
                               rebuilt by `ssl_em.inference.bioimageio.ProbabilityNet(meta)`
      test_input.npy           (1, 1, T, T) float32: a tile of real data (the sample volume)
      test_output.npy          (1, K, T, T) float32: what the model gives for it
      cover.png                that tile beside its predicted classes (2:1)
      README.md                documentation

Pre-processing reproduces ssl_em's with the spec's own operations: `scale_range` with
percentiles 0.5 and 99.5, `clip` to [0, 1], then `fixed_zero_mean_unit_variance` with the
backbone's recorded (mean, std). One difference remains, stated in the documentation:
bioimage.io takes the percentiles of each input tensor (a tile or a slice), ssl_em of the
whole volume; for whole slices of a homogeneous volume the two agree closely.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ssl_em import __version__
from ssl_em.data.normalize import IntensityStats, normalize_numpy
from ssl_em.data.volume import Volume
from ssl_em.finetune.model_folder import FinetunedMeta, SegmentationNet, build_net, load_finetuned
from ssl_em.licences import inherited_license, require_license

FORMAT_VERSION = "0.5.4"
#: Papers of the methods a backbone can come from, by the method class's name; timm always.
CITATIONS = {
    "MAE": {"text": "He et al. (2022) Masked Autoencoders Are Scalable Vision Learners. CVPR.", "doi": "10.1109/CVPR52688.2022.01553"},
    "MoCo": {"text": "Chen, Xie & He (2021) An Empirical Study of Training Self-Supervised Vision Transformers (MoCo v3). ICCV.", "doi": "10.1109/ICCV48922.2021.00950"},
    "DINO": {"text": "Caron et al. (2021) Emerging Properties in Self-Supervised Vision Transformers. ICCV.", "doi": "10.1109/ICCV48922.2021.00951"},
}
TIMM = {"text": "Wightman (2019) PyTorch Image Models (timm).", "url": "https://github.com/huggingface/pytorch-image-models"}
CEM500K = {"text": "Conrad & Narayan (2021) CEM500K, a large-scale heterogeneous unlabeled cellular electron microscopy image dataset for deep learning. eLife.", "doi": "10.7554/eLife.65894"}


class ProbabilityNet(nn.Module):
    """A fine-tuned SegmentationNet with its softmax: x (B, 1, H, W) standardised -> (B, K, H, W)
    class probabilities. Built from the model's FinetunedMeta as a plain dict, which is how
    bioimage.io's `pytorch_state_dict` weights rebuild it (`architecture.kwargs.meta`)."""

    def __init__(self, meta: dict) -> None:
        super().__init__()
        self.net = build_net(FinetunedMeta.from_dict(meta))

    @classmethod
    def wrapping(cls, net: SegmentationNet) -> "ProbabilityNet":
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.net = net
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).softmax(1)


def sample_tile(volume: Volume, tile: int) -> np.ndarray:
    """A (tile, tile) crop from the middle of the volume's middle slice, as float32. Refused
    (VolumeError) when it holds NaN/Inf or one value: its percentile stretch would be NaN,
    and so would the test tensors every bioimage.io consumer checks the model against."""
    from ssl_em.data.volume import VolumeError, check_finite

    z, (Y, X) = volume.shape[0] // 2, volume.shape[1:]
    if min(Y, X) < tile:
        raise ValueError(f"{volume.path}: slices of {Y} x {X} px are smaller than the model's {tile} px tile")
    y, x = (Y - tile) // 2, (X - tile) // 2
    raw = volume.read(z, slice(y, y + tile), slice(x, x + tile))[0]
    where = f"{volume.path} (slice {z}, y {y}..{y + tile - 1}, x {x}..{x + tile - 1}: the sample tile)"
    check_finite(raw, where)
    if raw.min() == raw.max():
        raise VolumeError(f"{where}: every pixel is {raw.min()}; give a --sample with tissue in the middle of its middle slice")
    return raw.astype(np.float32)


#: The author written when none is given (`--author NAME`).
UNNAMED_AUTHOR = "unnamed (set with ssl-em export-model --author NAME)"


def model_license(meta: FinetunedMeta, stated: str | None, where: str) -> str:
    """The SPDX licence a fine-tuned model is published under: `stated` (--license), else
    its pretrained backbone's stated licence; UserError when neither exists."""
    return require_license(stated, inherited_license(meta.backbone_meta.license, meta.random_init), where)


def preprocess(tile: np.ndarray, meta: FinetunedMeta) -> np.ndarray:
    """What the spec's preprocessing computes from one input tensor: percentiles of the tile
    itself (IntensityStats, linear interpolation like bioimage.io's), clip, standardise."""
    return normalize_numpy(tile, IntensityStats.compute(tile), meta.norm)


def export_bioimageio(model: str | Path, sample: Volume, out: str | Path, authors: list[str] | None = None, license: str | None = None) -> Path:
    """Write `model` (an `ssl-em finetune --out` folder) as a bioimage.io model into `out`;
    the test tensors come from `sample` (real data, e.g. the images it was fine-tuned on).
    license: SPDX identifier of the weights; None takes the one the backbone states
    (`ssl_em.licences`), and refuses when there is none."""
    net, meta = load_finetuned(model, device="cpu")
    T = meta.tile_size
    raw = sample_tile(sample, T)  # refused before anything is written
    license = model_license(meta, license, f"ssl-em export-model {Path(model).name}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prob = ProbabilityNet.wrapping(net).eval()
    x = torch.from_numpy(preprocess(raw, meta))[None, None]
    with torch.no_grad():
        y = prob(x)
        traced = torch.jit.trace(prob, x, check_trace=False)
    np.save(out / "test_input.npy", raw[None, None])
    np.save(out / "test_output.npy", y.numpy().astype(np.float32))
    traced.save(str(out / "weights_torchscript.pt"))
    torch.save({k: v.detach().cpu().contiguous() for k, v in prob.state_dict().items()}, out / "weights.pt")
    _cover(raw, y[0].numpy(), out / "cover.png")
    (out / "README.md").write_text(_documentation(meta, Path(model).name))
    # ViT-like backbones (a patch embedding) take their tile size only; CNNs any multiple.
    fixed = getattr(net.extractor.backbone, "patch_embed", None) is not None
    # No login name as the author (it says nothing to the people the model is shared with,
    # and is not the user's to publish): a stated placeholder until --author names them.
    description = _description(meta, Path(model).name, sample, authors or [UNNAMED_AUTHOR], license, None if fixed else net.extractor.spec.input_multiple)
    description["weights"] = _weights(out, meta)
    for tensor, name in ((description["inputs"][0], "test_input.npy"), (description["outputs"][0], "test_output.npy")):
        tensor["test_tensor"] = {"source": name, "sha256": _sha256(out / name)}
    description["covers"] = ["cover.png"]
    import yaml

    (out / "bioimageio.yaml").write_text(yaml.safe_dump(description, sort_keys=False))
    return out


def _description(meta: FinetunedMeta, name: str, sample: Volume, authors: list[str], license: str, multiple: int | None) -> dict:
    """The bioimageio.yaml content, weights and test tensors aside. `multiple`: the input side
    may be any multiple of it (the backbone's total reduction); None: the tile size only."""
    vs = sample.voxel_size if getattr(sample, "voxel_size_known", False) else None
    backbone = meta.backbone_meta
    method = (backbone.method or "").rsplit(".", 1)[-1]
    size = meta.tile_size if multiple is None else {"min": multiple, "step": multiple}

    def space(axis: str, size) -> dict:
        scale = {} if vs is None else {"unit": "nanometer", "scale": float(getattr(vs, axis))}
        # a copy per axis: one shared dict would be written as a YAML anchor and alias
        return {"type": "space", "id": axis, "size": dict(size) if isinstance(size, dict) else size} | scale

    cite = [c for key, c in CITATIONS.items() if method.startswith(key)] + [CEM500K, TIMM]
    norm = meta.norm
    return {
        "type": "model",
        "format_version": FORMAT_VERSION,
        "name": _name(f"ssl_em {meta.task} {backbone.architecture} {name}"),
        "description": f"{meta.task.capitalize()} segmentation of electron microscopy into {', '.join(meta.classes)}: a {backbone.architecture} "
                       f"backbone pretrained with {method or 'no pretraining'} by ssl_em, fine-tuned for {meta.steps} steps.",
        "authors": [{"name": a} for a in authors],
        "cite": cite,
        "license": license,
        "documentation": "README.md",
        "tags": ["electron-microscopy", "segmentation", "ssl_em", "pytorch", "2d", meta.task],
        "timestamp": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        "inputs": [{
            "id": "raw",
            "description": "raw EM intensities, one channel",
            "axes": [{"type": "batch"}, {"type": "channel", "channel_names": ["raw"]}, space("y", size), space("x", size)],
            "data": {"type": "float32"},
            "preprocessing": [
                {"id": "ensure_dtype", "kwargs": {"dtype": "float32"}},
                {"id": "scale_range", "kwargs": {"axes": ["channel", "y", "x"], "min_percentile": 0.5, "max_percentile": 99.5}},
                {"id": "clip", "kwargs": {"min": 0.0, "max": 1.0}},
                {"id": "fixed_zero_mean_unit_variance", "kwargs": {"mean": float(norm.mean), "std": float(norm.std)}},
            ],
        }],
        "outputs": [{
            "id": "probabilities",
            "description": f"class probabilities (softmax over {len(meta.classes)} classes)",
            "axes": [{"type": "batch"}, {"type": "channel", "channel_names": [_identifier(c) for c in meta.classes]},
                     space("y", {"tensor_id": "raw", "axis_id": "y"}), space("x", {"tensor_id": "raw", "axis_id": "x"})],
            "data": {"type": "float32"},
        }],
        "config": {"ssl_em": {"version": __version__, "task": meta.task, "classes": meta.classes, "label_values": meta.label_values,
                              "backbone": backbone.architecture, "method": backbone.method, "tile_size": meta.tile_size}},
    }


def _weights(out: Path, meta: FinetunedMeta) -> dict:
    version = torch.__version__.split("+")[0]
    meta_dict = json.loads(json.dumps(asdict(meta)))  # plain JSON types for the YAML
    # The backbone by its folder's name, not the path on the machine that trained the model
    # (it names that machine's folders and, often, its user).
    meta_dict["backbone_source"] = Path(meta.backbone_source).name if meta.backbone_source else ""
    return {
        # traced from the state dict's network: the state dict is the original
        "torchscript": {"source": "weights_torchscript.pt", "sha256": _sha256(out / "weights_torchscript.pt"), "pytorch_version": version, "parent": "pytorch_state_dict"},
        "pytorch_state_dict": {
            "source": "weights.pt",
            "sha256": _sha256(out / "weights.pt"),
            "architecture": {"callable": "ProbabilityNet", "import_from": "ssl_em.inference.bioimageio", "kwargs": {"meta": meta_dict}},
            "pytorch_version": version,
        },
    }


def _identifier(text: str) -> str:
    """Channel names must be identifiers: class "0" becomes "class_0"."""
    ident = re.sub(r"\W+", "_", text).strip("_")
    return ident if ident and not ident[0].isdigit() else f"class_{ident}"


def _name(text: str) -> str:
    """Model names take letters, digits and ' _-()+' only."""
    return re.sub(r"[^\w\-()+ ]+", "_", text)[:128]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cover(raw: np.ndarray, probs: np.ndarray, path: Path) -> None:
    """The test tile beside its predicted classes (2:1, as bioimage.io asks of covers)."""
    from PIL import Image

    from ssl_em.ngff import PALETTE

    lo, hi = np.percentile(raw, [0.5, 99.5])
    grey = (np.clip((raw - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)
    colours = np.array([[int(c[i : i + 2], 16) for i in (0, 2, 4)] for c in PALETTE], np.uint8)
    classes = colours[probs.argmax(0) % len(colours)]
    picture = np.concatenate([np.repeat(grey[..., None], 3, -1), classes], axis=1)
    scale = max(1, 256 // raw.shape[0])  # at least 512 x 256
    Image.fromarray(picture).resize((picture.shape[1] * scale, picture.shape[0] * scale), Image.NEAREST).save(path)


def _documentation(meta: FinetunedMeta, name: str) -> str:
    norm, backbone = meta.norm, meta.backbone_meta
    metrics = "\n".join(f"| {k} | {v:.4f} |" for k, v in meta.metrics.items() if isinstance(v, (int, float)))
    return f"""# {name}

{meta.task.capitalize()} segmentation of electron microscopy, exported from ssl_em {__version__}.

- backbone: {backbone.architecture}, pretrained with `{backbone.method}`; tile {meta.tile_size} px
- classes (output channels, in order): {', '.join(meta.classes)}
- input: one channel of raw EM intensities, any range

## Pre-processing
ssl_em stretches each volume with its own 0.5 and 99.5 percentiles to [0, 1], clips, and
standardises with the backbone's recorded mean {norm.mean:.4g} and std {norm.std:.4g}. This
model does the same with bioimage.io's operations (`scale_range`, `clip`,
`fixed_zero_mean_unit_variance`), except that the percentiles are those of each input tensor
rather than of the whole volume: give it whole slices, or tiles that show typical tissue.

## Output
Softmax class probabilities, one channel per class; the argmax is the segmentation.
{"" if meta.task != "instance" else "Instances: seeded watershed on (1 - background, boundary), as `ssl-em predict --instances` does."}

## Validation metrics (from fine-tuning)
| metric | value |
|---|---|
{metrics}
"""


# -- command line ---------------------------------------------------------------------------------

#: --format -> writer(model, sample volume, out, authors, license)
FORMATS = {"bioimageio": export_bioimageio}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a fine-tuned model folder (from `ssl-em finetune --out`)")
    parser.add_argument("--format", choices=sorted(FORMATS), default="bioimageio", help="what to write (default: bioimageio)")
    parser.add_argument("--sample", required=True, help="real data for the test tensors and cover, e.g. the images it was fine-tuned on (any format ssl_em reads)")
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--author", action="append", default=None, help="an author's name (repeat for several; without it the author is written as unnamed)")
    parser.add_argument("--license", default=None, help="SPDX licence identifier of the weights (default: the one the backbone states; required when it states none, or for a network trained from scratch)")
    parser.add_argument("--voxel-size", default=None, help="z,y,x nm of --sample (overrides the file)")


def run(args) -> int:
    import sys

    from ssl_em.data.readers.open import as_volume

    try:
        out = FORMATS[args.format](args.model, as_volume(args.sample, args.voxel_size), args.out, args.author, args.license)
    except ValueError as e:  # BackboneError, VolumeError, a sample smaller than a tile
        print(f"ssl-em export-model: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out / 'bioimageio.yaml'} (test it: bioimageio test {out / 'bioimageio.yaml'})")
    return 0
