"""Backbone in, fine-tuned model out: weights-only safetensors plus plain JSON.

A fine-tuned model is a folder::

    OUT/
      model.safetensors      SegmentationNet.state_dict(): "extractor.backbone.*" (the
                             unmodified timm backbone) and "head.*"
      ssl_em_finetuned.json  FinetunedMeta: backbone architecture + model_args, feature
                             indices, head class path + init args, classes, normalisation,
                             tile size, task, instance post-processing settings, metrics

`load_finetuned(path)` rebuilds the architecture from the JSON (timm factory + the head's
class path) and loads the weights strictly; nothing is unpickled.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from ssl_em import __version__
from ssl_em.atomic import recover_folder, replace_folder
from ssl_em.backbones import BackboneError, BackboneMeta, build_from_metadata, load_strict, read_json, read_safetensors
from ssl_em.data.normalize import Normalization
from ssl_em.features import FeatureExtractor, FeatureSpec
from ssl_em.metadata import check_finetuned

WEIGHTS, META = "model.safetensors", "ssl_em_finetuned.json"
FORMAT = "ssl_em.finetuned"


class SegmentationNet(nn.Module):
    """extractor (unmodified timm backbone) + head: x (B, in_chans, H, W) -> logits (B, K, H, W)."""

    def __init__(self, extractor: FeatureExtractor, head: nn.Module) -> None:
        super().__init__()
        self.extractor, self.head = extractor, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.extractor(x), x)


@dataclass
class FinetunedMeta:
    """Everything needed to rebuild a fine-tuned model and feed it images."""

    task: str
    classes: list[str]
    backbone: dict  # BackboneMeta.to_dict() of the backbone as fine-tuned
    feature_indices: list[int]
    head: dict  # {"class_path": ..., "init_args": {...}}
    tile_size: int
    backbone_source: str = ""
    normalization: dict = field(default_factory=lambda: Normalization().to_dict())
    ignore_index: int = -1
    label_values: list[int] | None = None  # raw label value of each class (semantic task)
    random_init: bool = False
    instance: dict = field(default_factory=dict)  # instance post-processing defaults
    metrics: dict = field(default_factory=dict)
    steps: int = 0
    format: str = FORMAT
    ssl_em_version: str = __version__

    @property
    def norm(self) -> Normalization:
        return Normalization.from_dict(self.normalization)

    @property
    def backbone_meta(self) -> BackboneMeta:
        return BackboneMeta.from_dict(self.backbone)

    @classmethod
    def from_dict(cls, d: dict) -> "FinetunedMeta":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def head_config(head: nn.Module) -> dict:
    return {"class_path": f"{type(head).__module__}.{type(head).__qualname__}", "init_args": dict(getattr(head, "init_args", {}))}


def build_head(config: dict, spec: FeatureSpec, num_classes: int, where: str = "head") -> nn.Module:
    """Instantiate a head from {"class_path", "init_args"}. The class must be one of ssl_em's
    own heads (`ssl_em.finetune.heads.HEADS`): a model folder is data, and a class path of
    the sender's choosing would make us import and run any module they name."""
    from ssl_em.finetune.heads import HEADS

    allowed = {f"{h.__module__}.{h.__qualname__}": h for h in HEADS}
    path = config.get("class_path") if isinstance(config, dict) else None
    cls = allowed.get(path) if isinstance(path, str) else None
    if cls is None:
        raise BackboneError(f"{where}: head class_path {path!r} is not one of ssl_em's heads ({', '.join(sorted(allowed))}); refusing to import it")
    init_args = config.get("init_args") or {}
    params = inspect.signature(cls.__init__).parameters
    foreign = sorted(k for k in init_args if k not in params or k in ("self", "spec", "num_classes"))
    if foreign:
        raise BackboneError(f"{where}: head init_args {foreign} are not arguments of {path}")
    return cls(spec, num_classes, **init_args)


def export_finetuned(net: SegmentationNet, out: str | Path, meta: FinetunedMeta) -> Path:
    """Write net.state_dict() (safetensors) and the metadata (JSON) as the folder `out`, all at
    once (`replace_folder`)."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    check_finetuned(asdict(meta), f"{out} ({META})", BackboneError)  # what load_finetuned will demand

    def fill(folder: Path) -> None:
        save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})
        (folder / META).write_text(json.dumps(asdict(meta), indent=2) + "\n")

    return replace_folder(out, fill, META)


def build_net(meta: FinetunedMeta, where: str = "fine-tuned model") -> SegmentationNet:
    """The architecture a FinetunedMeta describes, with random weights."""
    bb = meta.backbone_meta
    extractor = FeatureExtractor(build_from_metadata(bb.architecture, bb.model_args, where), indices=meta.feature_indices)
    return SegmentationNet(extractor, build_head(meta.head, extractor.spec, len(meta.classes), where))


def load_finetuned(path: str | Path, device: str | torch.device = "cpu") -> tuple[SegmentationNet, FinetunedMeta]:
    """Load a fine-tuned model strictly (safetensors + JSON only). Returns (net in eval mode, meta)."""
    path = recover_folder(path)
    if not (path / META).is_file() or not (path / WEIGHTS).is_file():
        raise BackboneError(f"{path}: no {META} + {WEIGHTS}; not a fine-tuned ssl_em model (make one with `ssl-em finetune --out`)")
    where = str(path / META)
    meta = FinetunedMeta.from_dict(check_finetuned(read_json(path / META, "fine-tuned model metadata"), where, BackboneError))
    if meta.format != FORMAT:
        raise BackboneError(f"{path}: {META} has format {meta.format!r}, expected {FORMAT!r}")
    net = build_net(meta, where)
    load_strict(net, read_safetensors(path / WEIGHTS), f"{path} (fine-tuned {meta.backbone.get('architecture')})")
    return net.to(device).eval(), meta
