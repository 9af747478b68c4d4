"""Backbones: build by timm name, describe, load strictly, and preprocess for.

Every stage uses this module (pretraining builds its backbone here, fine-tuning and
inference load one); it imports no stage. An exported backbone is a folder::

    checkpoints/NAME/
      config.json          timm's own local-dir config (architecture + model_args)
      model.safetensors    backbone.state_dict(), nothing else
      ssl_em.json          BackboneMeta: normalisation, pixel size, method, data fingerprint...
      README.md            model card
      pretrain_state.safetensors  optional: the pretraining method's own modules (SparK's
                           decoder and mask tokens), so `ssl-em pretrain --init_from`
                           continues the method, not just the encoder

`ssl_em.export` writes it; `timm.create_model("local-dir:checkpoints/NAME", pretrained=True)`
loads it with only timm installed. `ssl_em.load_backbone(path)` loads the backbone strictly
and returns the metadata too; `ssl_em.preprocessing(path)` performs the per-volume percentile
stretch and the recorded standardisation that timm's transform cannot express.
Nothing here unpickles: loading reads safetensors and JSON only, and a model folder's
metadata is data (a plain timm name and that architecture's own arguments), never code.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

import numpy as np

from ssl_em import __version__
from ssl_em.atomic import recover_folder
from ssl_em.data.normalize import IntensityStats, Normalization, normalize_numpy
from ssl_em.errors import UserError, first_line, read_json_object
from ssl_em.metadata import check_backbone, check_finetuned

WEIGHTS, CONFIG, META, CARD = "model.safetensors", "config.json", "ssl_em.json", "README.md"
#: The EM backbone shipped in the repository's checkpoints/ (see its model card): the default
#: wherever ssl_em offers one (the demo's comparison, the napari widget). Present in a source
#: checkout (an editable install), absent from a wheel.
SHIPPED_BACKBONE = Path(__file__).resolve().parents[1] / "checkpoints" / "em_resnet18_spark_v3"
#: The method's own weights (everything but the backbone), for continued pretraining.
METHOD_STATE = "pretrain_state.safetensors"


class BackboneError(UserError):
    """A backbone cannot be built or loaded as asked; the message says why in one line."""


@dataclass
class BackboneMeta:
    """Everything needed to rebuild a backbone and feed it the images it was trained on."""

    architecture: str
    model_args: dict = field(default_factory=dict)
    in_chans: int = 1
    img_size: int | None = None
    patch_size: int | None = None
    pixel_size_nm: float | None = None
    normalization: dict = field(default_factory=lambda: Normalization().to_dict())
    method: str | None = None
    recipe: str | None = None  # the recipe's name(s), never a path of the training machine
    recipe_content: str | None = None  # the recipe file(s) as they were
    steps: int | None = None
    data_fingerprint: str | None = None
    # SegmentationModule settings that fine-tune this backbone best, as its pretraining
    # method measured them ({"unfreeze_at_step": 0, "backbone_lr_scale": 1.0} for SparK);
    # `ssl-em finetune` and the benchmark use them unless the user sets those keys.
    finetune: dict = field(default_factory=dict)
    ssl_em_version: str = __version__
    tiles: int | None = None  # tiles this backbone's own run saw (steps x tiles per step)
    # The exported backbones it continued (`--init_from`), oldest first, and the images its
    # own run drew tiles from: see ssl_em.lineage.
    lineage: list = field(default_factory=list)
    data_sources: list | None = None
    # SPDX licence of the weights as their exporter stated it (`ssl-em export --license`);
    # None: not stated, the training data's terms apply (ssl_em.licences).
    license: str | None = None

    @property
    def norm(self) -> Normalization:
        return Normalization.from_dict(self.normalization)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BackboneMeta":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _takes_img_size(name: str) -> bool:
    """Models whose input size is fixed at construction (ViTs, Swin...) take `img_size`;
    convolutional ones accept any size and reject the argument."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name.split(".")[0])
    return bool(cfg is not None and cfg.fixed_input_size)


def build_backbone(name: str, in_chans: int = 1, img_size: int | None = None, **kwargs) -> nn.Module:
    """A randomly initialised timm backbone without classifier: num_classes=0, pretrained=False.

    img_size is passed only to models with a fixed input size and must then be a multiple of
    the patch size. kwargs go to timm as they are (depth, embed_dim, drop_path_rate...).
    """
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise BackboneError(f"unknown timm backbone {name!r}{hint}")
    if img_size is not None and _takes_img_size(name):
        kwargs["img_size"] = img_size
    kwargs.setdefault("num_classes", 0)
    model = timm.create_model(name, pretrained=False, in_chans=in_chans, **kwargs)
    patch, size = patch_size_of(model), kwargs.get("img_size")
    sizes = (size,) if isinstance(size, int) else tuple(size or ())
    if patch is not None and any(s % patch for s in sizes):
        raise BackboneError(f"tile size {size} is not divisible by the patch size {patch} of {name}; use a multiple of {patch}")
    return model


@functools.lru_cache(maxsize=None)
def _architecture_params(name: str) -> frozenset[str]:
    """The keyword arguments the architecture's class takes, read from its __init__ after a
    build on the meta device (no memory, no weights; 0.1 s for a ViT-B)."""
    import timm

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=0)
    params = inspect.signature(type(model).__init__).parameters.values()
    return frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self")


def build_from_metadata(architecture, model_args, where: str) -> nn.Module:
    """build_backbone from what a shared folder or checkpoint says, treated as data: the
    architecture must be a plain timm name (no `hf-hub:` / `local-dir:` source) and only
    the architecture's own constructor arguments pass. timm's factory options
    (`checkpoint_path`, `pretrained`, `pretrained_cfg_overlay`, `cache_dir`...) would let a
    model folder make timm read a file or download weights of the sender's choosing."""
    import timm

    if not isinstance(architecture, str) or ":" in architecture or not timm.is_model(architecture):
        raise BackboneError(f"{where}: architecture {architecture!r} is not a timm model name; refusing to build it")
    if not isinstance(model_args, dict):
        raise BackboneError(f"{where}: model_args must be a mapping of arguments, got {type(model_args).__name__}")
    # img_size is build_backbone's own argument (given to fixed-size models only).
    foreign = sorted(k for k in model_args if k not in _architecture_params(architecture) | {"img_size"})
    if foreign:
        raise BackboneError(f"{where}: model_args {foreign} are not arguments of the {architecture} architecture; "
                            "refusing to pass them to timm (a shared model is data, never code)")
    try:
        return build_backbone(architecture, **model_args)
    except (TypeError, AssertionError, RuntimeError) as err:
        raise BackboneError(f"{where}: cannot build {architecture} from model_args {model_args}: {err}") from err


def read_json(path: Path, what: str) -> dict:
    """A JSON object from `path`; BackboneError naming the file when it is not one."""
    return read_json_object(path, what, BackboneError)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file; BackboneError naming the file when it is truncated or
    not safetensors at all (safetensors' own error does not say which file)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise BackboneError(f"{path}: not a readable safetensors file ({first_line(err)}); the weights are damaged or truncated") from None


def patch_size_of(model: nn.Module) -> int | None:
    """The (square) patch size of a ViT-like model, None for CNNs."""
    pe = getattr(model, "patch_embed", None)
    ps = getattr(pe, "patch_size", None)
    return None if ps is None else int(ps[0] if isinstance(ps, (tuple, list)) else ps)



def resolve_backbone(backbone: str | Path, random_init: bool = False, tile_size: int | None = None) -> tuple[nn.Module, BackboneMeta]:
    """A backbone and its metadata from an exported folder or a timm name.

    backbone: `checkpoints/NAME` (an `ssl-em export` folder) or a timm model name (always
    random weights; `pretrained=True` is never used). random_init: same architecture and
    model_args as the folder's, fresh weights (the like-for-like baseline).
    tile_size: ViTs are resized to it (position embeddings resampled) when it differs
    from the pretraining img_size; `model_args["img_size"]` then records the new size.
    """
    path = Path(backbone)
    if (path / META).is_file():
        model, meta = load_backbone(path)
        meta = BackboneMeta.from_dict(meta.to_dict())
        if random_init:
            model = build_backbone(meta.architecture, **meta.model_args)
            meta.method = "random-init"
    elif path.exists() or "/" in str(backbone):
        raise BackboneError(f"{backbone}: not an exported backbone folder (no {META}); make one with `ssl-em export`, or give a timm model name")
    else:
        args = {"in_chans": 1, "img_size": tile_size}
        model = build_backbone(str(backbone), **args)
        meta = BackboneMeta(architecture=str(backbone), model_args=args, in_chans=1, img_size=tile_size, patch_size=patch_size_of(model), method="random-init")
    patch = patch_size_of(model)
    if tile_size is not None and patch is not None and tile_size % patch:
        raise BackboneError(f"tile size {tile_size} is not divisible by the patch size {patch} of {meta.architecture}; use a multiple of {patch}")
    if tile_size is not None and hasattr(model, "set_input_size") and meta.model_args.get("img_size") not in (None, tile_size):
        model.set_input_size(img_size=tile_size)
        meta.model_args = {**meta.model_args, "img_size": tile_size}
        meta.img_size = tile_size
    return model, meta


@dataclass(frozen=True)
class Preprocessing:
    """ssl_em's exact preprocessing for an exported backbone: stretch each volume by its own
    p0.5..p99.5 to [0, 1], clip, then (x - mean) / std with the backbone's recorded values.

    `pre = ssl_em.preprocessing("checkpoints/NAME")`; `x = pre(image)` gives a float32
    tensor of image's shape, statistics taken from `image` itself; pass `stats=pre.stats(volume)`
    to use a whole volume's percentiles for each of its slices, as ssl_em does."""

    norm: Normalization

    def stats(self, volume: np.ndarray) -> IntensityStats:
        return IntensityStats.compute(volume)

    def __call__(self, image: np.ndarray, stats: IntensityStats | None = None) -> torch.Tensor:
        """image: (..., H, W) any real dtype -> float32 tensor of the same shape."""
        return torch.from_numpy(normalize_numpy(np.asarray(image), stats or self.stats(image), self.norm))


def preprocessing(path: str | Path) -> Preprocessing:
    """The preprocessing an exported backbone (or a fine-tuned model) was trained with."""
    path = Path(path)
    if (path / META).is_file():
        return Preprocessing(backbone_meta(path).norm)
    if (path / "ssl_em_finetuned.json").is_file():
        d = read_json(path / "ssl_em_finetuned.json", "fine-tuned model metadata")
        return Preprocessing(Normalization.from_dict(check_finetuned(d, str(path / "ssl_em_finetuned.json"), BackboneError)["normalization"]))
    raise BackboneError(f"{path}: no {META}; not an ssl_em backbone folder (make one with `ssl-em export`)")


def backbone_meta(backbone: str | Path) -> BackboneMeta | None:
    """The metadata of an exported backbone folder; None for anything else (a timm name)."""
    path = Path(backbone) / META
    if not path.is_file():
        return None
    return BackboneMeta.from_dict(check_backbone(read_json(path, "backbone metadata"), str(path), BackboneError))


def load_backbone(path: str | Path, architecture: str | None = None, device: str | torch.device = "cpu") -> tuple[nn.Module, BackboneMeta]:
    """Load an exported backbone strictly from safetensors + JSON. `architecture`, if given,
    must match the recorded one. Raises BackboneError with the reason otherwise."""
    path = recover_folder(path)
    if not path.is_dir():
        raise BackboneError(f"{path}: no such backbone folder (make one with `ssl-em export`)")
    for name in (WEIGHTS, META):
        if not (path / name).is_file():
            raise BackboneError(f"{path}: no {name}; not an ssl_em backbone folder (make one with `ssl-em export`)")
    meta = backbone_meta(path)
    if architecture is not None and architecture != meta.architecture:
        raise BackboneError(f"{path}: holds a {meta.architecture} backbone, not the {architecture} asked for")
    model = build_from_metadata(meta.architecture, meta.model_args, str(path / META))
    load_strict(model, read_safetensors(path / WEIGHTS), f"{path} ({meta.architecture})")
    return model.to(device), meta


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict(strict=True) with a one-line error naming what does not fit."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    problems = [f"{len(missing)} missing (e.g. {missing[:3]})"] * bool(missing) + [f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"] * bool(unexpected) + [f"{len(shapes)} of another shape (e.g. {shapes[:2]})"] * bool(shapes)
    if problems:
        raise BackboneError(f"{what}: weights do not fit the architecture: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def method_state_owner(folder: str | Path) -> str | None:
    """The method that wrote an export's METHOD_STATE (read from its header only, no tensors),
    or None when the folder has none (exports from before they were kept)."""
    from safetensors import safe_open

    path = Path(folder) / METHOD_STATE
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("method")
