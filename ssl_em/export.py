"""Backbones in and out: build by timm name, export a pretrained one, load it back strictly.

An exported backbone is a folder::

    checkpoints/NAME/
      config.json          timm's own local-dir config (architecture + model_args)
      model.safetensors    backbone.state_dict(), nothing else
      ssl_em.json          BackboneMeta: normalisation, pixel size, method, data fingerprint...
      README.md            model card
      pretrain_state.safetensors  optional: the pretraining method's own modules (SparK's
                           decoder and mask tokens), so `ssl-em pretrain --init_from`
                           continues the method, not just the encoder

`timm.create_model("local-dir:checkpoints/NAME", pretrained=True)` loads it with only timm
installed, and timm's `resolve_data_config` + `create_transform` then keep EM tiles at their
size (crop_pct 1.0, bilinear) and standardise with the recorded (mean, std); they cannot do
the per-volume percentile stretch that comes first, which `pretrained_cfg["notes"]`
describes and `ssl_em.preprocessing(path)` performs. `ssl_em.load_backbone(path)` loads the
backbone strictly and returns the metadata too. Files are written with the process's
normal permissions (umask), so a shared folder stays readable by colleagues.
Nothing here unpickles a file that left a run: loading reads safetensors and JSON only. The
one torch.load (of our own Lightning checkpoint, at export) uses weights_only=True.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import inspect
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

import numpy as np

from ssl_em import __version__
from ssl_em.data.normalize import IntensityStats, Normalization, normalize_numpy
from ssl_em.errors import UserError, check_parent_folders, read_json_object
from ssl_em.metadata import check_backbone, check_finetuned

WEIGHTS, CONFIG, META, CARD = "model.safetensors", "config.json", "ssl_em.json", "README.md"
#: The method's own weights (everything but the backbone), for continued pretraining.
METHOD_STATE = "pretrain_state.safetensors"
#: The licence weights are shared under (the model card's and pretrained_cfg's); ssl_em's own.
LICENSE = "bsd-3-clause"
#: What timm's transform cannot do and must come first (pretrained_cfg["notes"]).
STRETCH = ("per volume: (x - p0.5) / (p99.5 - p0.5) with the volume's own percentiles, clipped to [0, 1], "
           "then (x - mean) / std; ssl_em.preprocessing(path) does both")


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
        raise BackboneError(f"{path}: not a readable safetensors file ({_first_line(err)}); the weights are damaged or truncated") from None


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return (lines[0] if lines else type(err).__name__)[:200]


def patch_size_of(model: nn.Module) -> int | None:
    """The (square) patch size of a ViT-like model, None for CNNs."""
    pe = getattr(model, "patch_embed", None)
    ps = getattr(pe, "patch_size", None)
    return None if ps is None else int(ps[0] if isinstance(ps, (tuple, list)) else ps)


#: Storage types `--dtype` offers. Half precision halves the file (a ResNet-18 is 45 MB in
#: float32); `load_state_dict` casts back into the model's float32 parameters on load.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _stored(state: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    cast = DTYPES[dtype]
    return {k: (v.to(cast) if v.is_floating_point() else v).detach().cpu().contiguous() for k, v in state.items()}


def export_backbone(backbone: nn.Module, out: str | Path, meta: BackboneMeta, dtype: str = "float32",
                    method_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write backbone.state_dict() and its configs into `out` (created). Returns `out`.
    dtype: storage type of floating-point tensors (integer buffers stay as they are).
    method_state: the pretraining method's non-backbone weights (keys as in the method's
    state_dict), written to METHOD_STATE with the method's name, for `--init_from`."""
    from safetensors.torch import save_file
    from timm.models._hub import save_config_for_hf

    out = Path(out)
    state = _stored(backbone.state_dict(), dtype)
    # The architecture's defaults name ImageNet weights and ImageNet preprocessing; ours
    # replace them: grey tiles at the training size, no crop (crop_pct 1: an EM tile has no
    # "object in the middle"), bilinear (no bicubic overshoot on membranes), the recorded
    # standardisation, and the stretch timm cannot express, in words.
    data_config = {"mean": (meta.norm.mean,) * meta.in_chans, "std": (meta.norm.std,) * meta.in_chans,
                   "crop_pct": 1.0, "crop_mode": "center", "interpolation": "bilinear"}
    if meta.img_size:
        data_config["input_size"] = (meta.in_chans, meta.img_size, meta.img_size)
    # timm's PretrainedCfg takes no keys of ours: the stretch goes into its free-text notes.
    description = f"{meta.architecture} pretrained on electron microscopy by ssl_em ({meta.method})"
    model_config = {"pretrained_cfg": {"tag": "ssl_em", "license": LICENSE, "description": description, "notes": (STRETCH,)}}

    # What every reader will check, checked before writing: a run on constant or non-finite
    # data records a NaN normalisation that must not leave it.
    check_backbone(meta.to_dict(), f"{out} ({META})", BackboneError)

    def fill(folder: Path) -> None:
        save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})
        if method_state:
            save_file(_stored(method_state, dtype), str(folder / METHOD_STATE), metadata={"format": "pt", "method": str(meta.method)})
        save_config_for_hf(backbone, str(folder / CONFIG), model_config=model_config, data_config=data_config)
        (folder / META).write_text(json.dumps(meta.to_dict(), indent=2) + "\n")
        (folder / CARD).write_text(model_card(meta, out.name))

    return replace_folder(out, fill, META)


def write_atomic(path: Path, write) -> None:
    """Write through a temporary file, then rename. Some writers (safetensors) create files
    with mode 0600; the result gets the mode a plain open() would give (0666 & ~umask)."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


def check_out_folder(out: str | Path, marker: str) -> Path:
    """`out` may be missing, empty, or an earlier model folder (it holds `marker`); anything
    else is refused (UserError) rather than replaced: it may be the user's own files."""
    out = recover_folder(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: is a file; --out must be a folder (missing, empty, or an earlier export)")
    if out.is_dir() and any(out.iterdir()) and not (out / marker).is_file():
        raise UserError(f"{out}: is a non-empty folder without {marker}, not an earlier export; refusing to replace it (choose another --out)")
    check_parent_folders(out, str(out))
    return out


def replace_folder(out: str | Path, fill, marker: str) -> Path:
    """Write a whole folder at once: `fill(tmp)` writes every file into a temporary folder
    beside `out`, which then takes `out`'s place. Readers see the old folder or the new one,
    never weights of one run beside metadata of another.

    An existing `out` is swapped with the new folder in one step (Linux renameat2
    RENAME_EXCHANGE), so `out` exists at every instant. Where that call is missing (other
    systems, some network file systems) the old folder is first renamed to `.NAME.old`
    beside it: a crash between the two renames leaves it there, and the next export or load
    of `out` (`recover_folder`) puts it back. Returns `out`."""
    out = check_out_folder(out, marker)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared model from the group
        fill(tmp)
        for f in tmp.iterdir():  # safetensors writes 0600; give what a plain open() would
            os.chmod(f, 0o666 & ~_umask())
        if not out.exists():
            os.replace(tmp, out)
        elif exchange_paths(tmp, out):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
        else:
            old = _old_copy(out)
            shutil.rmtree(old, ignore_errors=True)  # a leftover of a crash whose `out` was since rewritten
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)  # put the old one back: `out` must not vanish
                raise
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _old_copy(out: Path) -> Path:
    """Where replace_folder keeps the old `out` between its two renames (without renameat2)."""
    return out.with_name(f".{out.name}.old")


def recover_folder(out: str | Path) -> Path:
    """Put back a folder that a crash inside replace_folder's fallback left as `.NAME.old`
    (only when `out` itself is missing, so nothing is ever overwritten). Returns `out`."""
    out = Path(out)
    old = _old_copy(out)
    if not out.exists() and old.is_dir():
        try:
            os.replace(old, out)
        except OSError:  # another process recovered it first, or the folder is read-only
            pass
    return out


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap the two existing paths `a` and `b` atomically (Linux renameat2 with
    RENAME_EXCHANGE, glibc >= 2.28). False where the system or file system lacks it;
    OSError naming both paths for any other failure."""
    import ctypes
    import errno

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux/glibc
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2  # <fcntl.h>, <linux/fs.h>
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _umask() -> int:
    """The process's umask. Linux reports it in /proc; elsewhere reading it means setting it
    (briefly, so another thread creating a file at that instant could get mode 0666)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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


# -- from a training run ---------------------------------------------------------------------


def find_checkpoint(run_or_ckpt: str | Path) -> Path:
    """A .ckpt as given, or a run dir's checkpoints/last.ckpt (else its newest .ckpt)."""
    p = Path(run_or_ckpt)
    if not p.exists():
        raise UserError(f"{p}: no such run folder or checkpoint")
    if p.is_file():
        return p
    if (p / "checkpoints" / "last.ckpt").is_file():
        return p / "checkpoints" / "last.ckpt"
    found = sorted(p.rglob("*.ckpt"), key=lambda f: f.stat().st_mtime)
    if not found:
        raise UserError(f"{p}: no checkpoint (.ckpt) found in this run folder")
    return found[-1]


def read_checkpoint(ckpt: str | Path) -> dict:
    """Our own Lightning checkpoint, loaded without unpickling arbitrary objects.
    UserError naming the file when it is truncated or not a checkpoint."""
    import pickle

    try:
        ckpt_dict = torch.load(ckpt, map_location="cpu", weights_only=True)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except (RuntimeError, OSError, pickle.UnpicklingError, EOFError, ValueError, AttributeError) as err:
        raise UserError(f"{ckpt}: not a readable checkpoint ({_first_line(err)}); truncated by a crash? "
                        "use an earlier one (checkpoints/step*.ckpt)") from None
    if not isinstance(ckpt_dict, dict) or "state_dict" not in ckpt_dict:
        raise UserError(f"{ckpt}: not a Lightning checkpoint (no state_dict)")
    return ckpt_dict


def backbone_from_checkpoint(ckpt: dict, where: str = "checkpoint") -> tuple[nn.Module, BackboneMeta]:
    """Rebuild `module.backbone` from a Lightning checkpoint written by a PretrainMethod."""
    run = ckpt.get("ssl_em")
    if not run or not isinstance(run, dict):
        raise BackboneError(f"{where}: has no 'ssl_em' metadata; was it written by `ssl-em pretrain`?")
    model = build_from_metadata(run.get("architecture"), run.get("model_args"), where)
    prefix = "backbone."  # the method's attribute name; the backbone's own keys stay untouched
    load_strict(model, {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}, run["architecture"])
    args = run["model_args"]
    meta = BackboneMeta(
        architecture=run["architecture"],
        model_args=args,
        in_chans=int(args.get("in_chans", 1)),
        img_size=_first(args.get("img_size")) or run.get("tile_size"),  # CNNs: the tile they were trained on
        patch_size=patch_size_of(model),
        pixel_size_nm=run.get("pixel_size_nm"),
        normalization=run.get("normalization") or Normalization().to_dict(),
        method=run.get("method"),
        # Checkpoints from before recipes were recorded by name held their paths.
        recipe=",".join(Path(r).stem for r in run["recipe"].split(",")) if run.get("recipe") else None,
        recipe_content=run.get("recipe_content"),
        steps=int(ckpt.get("global_step", 0)),
        data_fingerprint=run.get("data_fingerprint"),
        finetune=dict(run.get("finetune") or {}),
    )
    return model, meta


def _first(size) -> int | None:
    return size[0] if isinstance(size, (list, tuple)) else size


def export_run(run_or_ckpt: str | Path, out: str | Path, dtype: str = "float32", method_state: bool = True) -> Path:
    check_out_folder(out, META)  # before reading a checkpoint of gigabytes
    ckpt_path = find_checkpoint(run_or_ckpt)
    ckpt = read_checkpoint(ckpt_path)
    model, meta = backbone_from_checkpoint(ckpt, str(ckpt_path))
    prefix = "backbone."
    rest = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith(prefix)} if method_state else None
    return export_backbone(model, out, meta, dtype, method_state=rest)


def method_state_owner(folder: str | Path) -> str | None:
    """The method that wrote an export's METHOD_STATE (read from its header only, no tensors),
    or None when the folder has none (exports from before they were kept)."""
    from safetensors import safe_open

    path = Path(folder) / METHOD_STATE
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("method")


def _recipe_text(recipe: dict) -> str:
    if not recipe:
        return "ssl-em finetune's defaults"
    return ", ".join(f"`{k}: {v}`" for k, v in recipe.items()) + " (recorded in ssl_em.json; `ssl-em finetune` and the benchmark use them unless set)"


def model_card(meta: BackboneMeta, name: str) -> str:
    """README.md with the front matter the Hugging Face Hub reads. The snippet loads the
    folder the card sits in, wherever it has been copied: run it from beside the folder, or
    replace the folder name with its path (or `hf-hub:ORG/NAME` once uploaded)."""
    norm, method = meta.norm, (meta.method or "unknown").rsplit(".", 1)[-1]
    pixel = f"{meta.pixel_size_nm:g} nm" if meta.pixel_size_nm else "not recorded (native resolution of the data)"
    tags = ["electron-microscopy", "self-supervised", "ssl_em", "timm", f"ssl-{method.lower()}"]
    front = "\n".join(["---", f"license: {LICENSE}", "library_name: timm", "pipeline_tag: image-feature-extraction", "tags:"]
                      + [f"- {t}" for t in tags] + ["---"])
    return f"""{front}
# {name}

A {meta.architecture} backbone pretrained with {method} (`{meta.method}`) by ssl_em
{meta.ssl_em_version} for {meta.steps} steps on data `{meta.data_fingerprint}` (recipe: `{meta.recipe}`).

| | |
|---|---|
| input | {meta.in_chans} channel(s), {meta.img_size or 'any'} px tiles{f', patch {meta.patch_size}' if meta.patch_size else ''} |
| pixel size | {pixel} |
| intensities | {STRETCH}; mean {norm.mean:.4g}, std {norm.std:.4g} |
| fine-tuning | {_recipe_text(meta.finetune)} |

```python
from pathlib import Path
import timm  # no ssl_em needed
folder = Path("{name}")  # this folder: its path from where you run this
model = timm.create_model(f"local-dir:{{folder.resolve()}}", pretrained=True)
cfg = timm.data.resolve_data_config(model=model)  # tile size, crop_pct 1.0, mean/std above

import ssl_em  # or: strict load, the metadata, and the exact preprocessing
model, meta = ssl_em.load_backbone(folder)
x = ssl_em.preprocessing(folder)(image)  # image: (H, W) raw EM -> stretched, standardised float32
```
"""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="a pretraining run dir (uses checkpoints/last.ckpt) or a .ckpt file")
    parser.add_argument("--out", required=True, help="folder to write (e.g. checkpoints/NAME/)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="storage type of the weights (float16 halves the file; loading casts back to float32)")
    parser.add_argument("--method-state", action=argparse.BooleanOptionalAction, default=True,
                        help=f"also write {METHOD_STATE}, the method's decoder/heads, so `ssl-em pretrain --init_from` continues the method (default: yes)")


def launcher_rank() -> int:
    """This process's rank when a launcher started several (torch.distributed's, torchrun's
    RANK, srun's SLURM_PROCID), else 0."""
    from ssl_em.seeding import process_rank

    if "RANK" not in os.environ and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return int(os.environ.get("SLURM_PROCID", 0))
    return process_rank()


def run(args) -> int:
    # One writer per artefact: a job script that runs `ssl-em export` on every rank (srun,
    # torchrun) writes the folder once, from rank 0; two ranks swapping one folder race.
    rank = launcher_rank()
    try:
        if rank != 0:
            print(f"ssl-em export: rank {rank}: rank 0 writes {args.out}; nothing to do here")
            return 0
        out = export_run(args.run, args.out, args.dtype, args.method_state)
        print(f"exported {out} (timm.create_model('local-dir:{out}', pretrained=True) loads it)")
        return 0
    finally:  # in a process group, the other ranks return once the export is in place
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
