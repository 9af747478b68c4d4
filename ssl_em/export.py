"""Export a pretraining run as a backbone folder (layout: `ssl_em.backbones`).

`ssl-em export RUN --out checkpoints/NAME` reads the run's Lightning checkpoint (the one
torch.load here uses weights_only=True: our own file, still never unpickling objects),
rebuilds the backbone strictly, and writes `config.json` + `model.safetensors` (timm's
local-dir format), `ssl_em.json` and a model card, all at once (`ssl_em.atomic.replace_folder`).
timm's `resolve_data_config` + `create_transform` then keep EM tiles at their size
(crop_pct 1.0, bilinear) and standardise with the recorded (mean, std); the per-volume
percentile stretch that comes first is described in `pretrained_cfg["notes"]`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from ssl_em.atomic import check_out_folder, replace_folder
from ssl_em.backbones import CARD, CONFIG, META, METHOD_STATE, WEIGHTS, BackboneError, BackboneMeta, build_from_metadata, load_strict, patch_size_of
from ssl_em.data.normalize import Normalization
from ssl_em.errors import UserError, first_line
from ssl_em.licences import UNSTATED, spdx_license
from ssl_em.metadata import check_backbone
from ssl_em.seeding import launcher_rank

#: What timm's transform cannot do and must come first (pretrained_cfg["notes"]).
STRETCH = ("per volume: (x - p0.5) / (p99.5 - p0.5) with the volume's own percentiles, clipped to [0, 1], "
           "then (x - mean) / std; ssl_em.preprocessing(path) does both")


#: Storage types `--dtype` offers. Half precision halves the file (a ResNet-18 is 45 MB in
#: float32); `load_state_dict` casts back into the model's float32 parameters on load.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _stored(state: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    cast = DTYPES[dtype]
    return {k: (v.to(cast) if v.is_floating_point() else v).detach().cpu().contiguous() for k, v in state.items()}


def export_backbone(backbone: nn.Module, out: str | Path, meta: BackboneMeta, dtype: str = "float32",
                    method_state: dict[str, torch.Tensor] | None = None, notes: str = "") -> Path:
    """Write backbone.state_dict() and its configs into `out` (created). Returns `out`.
    dtype: storage type of floating-point tensors (integer buffers stay as they are).
    method_state: the pretraining method's non-backbone weights (keys as in the method's
    state_dict), written to METHOD_STATE with the method's name, for `--init_from`.
    notes: markdown appended to the model card (what was measured, the data's terms)."""
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
    model_config = {"pretrained_cfg": {"tag": "ssl_em", "license": (meta.license or UNSTATED).lower(), "description": description, "notes": (STRETCH,)}}

    # What every reader will check, checked before writing: a run on constant or non-finite
    # data records a NaN normalisation that must not leave it.
    check_backbone(meta.to_dict(), f"{out} ({META})", BackboneError)

    def fill(folder: Path) -> None:
        save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})
        if method_state:
            save_file(_stored(method_state, dtype), str(folder / METHOD_STATE), metadata={"format": "pt", "method": str(meta.method)})
        save_config_for_hf(backbone, str(folder / CONFIG), model_config=model_config, data_config=data_config)
        (folder / META).write_text(json.dumps(meta.to_dict(), indent=2) + "\n")
        (folder / CARD).write_text(model_card(meta, out.name, notes))

    return replace_folder(out, fill, META)



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
        raise UserError(f"{ckpt}: not a readable checkpoint ({first_line(err)}); truncated by a crash? "
                        "use an earlier one (checkpoints/step*.ckpt)") from None
    if not isinstance(ckpt_dict, dict) or "state_dict" not in ckpt_dict:
        raise UserError(f"{ckpt}: not a Lightning checkpoint (no state_dict)")
    return ckpt_dict


def deployable_prefix(run: dict, where: str) -> str:
    """State-dict prefix of the network a method deploys (`PretrainMethod.deployable`, recorded
    in its checkpoints' "ssl_em" metadata): "backbone." unless the method named another, e.g.
    DINO's "teacher_backbone."; checkpoints from before the hook hold no name."""
    name = run.get("deployable", "backbone")
    if not isinstance(name, str) or not name.isidentifier():
        raise BackboneError(f"{where}: its 'deployable' entry {name!r} is not a module name")
    return name + "."


def backbone_from_checkpoint(ckpt: dict, where: str = "checkpoint") -> tuple[nn.Module, BackboneMeta]:
    """Rebuild `module.backbone` from a Lightning checkpoint written by a PretrainMethod."""
    run = ckpt.get("ssl_em")
    if not run or not isinstance(run, dict):
        raise BackboneError(f"{where}: has no 'ssl_em' metadata; was it written by `ssl-em pretrain`?")
    model = build_from_metadata(run.get("architecture"), run.get("model_args"), where)
    prefix = deployable_prefix(run, where)  # the method's attribute name; the backbone's own keys stay untouched
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
        tiles=int(ckpt.get("global_step", 0)) * run["tiles_per_step"] if run.get("tiles_per_step") else None,
        lineage=list(run.get("lineage") or []),
        data_sources=run.get("data_sources"),
    )
    return model, meta


def _first(size) -> int | None:
    return size[0] if isinstance(size, (list, tuple)) else size


def export_run(run_or_ckpt: str | Path, out: str | Path, dtype: str = "float32", method_state: bool = True, notes: str | Path | None = None,
               license: str | None = None) -> Path:
    """Export a run's (or a checkpoint's) backbone into `out`. license: SPDX identifier of
    the weights as the exporter states it; None records none (`ssl_em.licences`)."""
    check_out_folder(out, META)  # before reading a checkpoint of gigabytes
    notes_text = read_notes(notes) if notes else ""
    license = spdx_license(license) if license else None
    ckpt_path = find_checkpoint(run_or_ckpt)
    ckpt = read_checkpoint(ckpt_path)
    model, meta = backbone_from_checkpoint(ckpt, str(ckpt_path))
    meta.license = license
    prefix = deployable_prefix(ckpt["ssl_em"], str(ckpt_path))
    rest = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith(prefix)} if method_state else None
    return export_backbone(model, out, meta, dtype, method_state=rest, notes=notes_text)


def read_notes(path: str | Path) -> str:
    """The text of a model-card notes file (markdown, UTF-8); BackboneError if unreadable."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BackboneError(f"--notes {path}: cannot read it as UTF-8 text ({first_line(e)})") from None



def _recipe_text(recipe: dict) -> str:
    if not recipe:
        return "ssl-em finetune's defaults"
    return ", ".join(f"`{k}: {v}`" for k, v in recipe.items()) + " (recorded in ssl_em.json; `ssl-em finetune` and the benchmark use them unless set)"


def _license_text(license: str | None) -> str:
    if license:
        return f"{license}, as stated by the exporter (`ssl-em export --license`)"
    return ("not stated: the weights carry the terms of the data they were trained on (below); "
            "ssl_em's code licence does not cover them")


def model_card(meta: BackboneMeta, name: str, notes: str = "") -> str:
    """README.md with the front matter the Hugging Face Hub reads. The snippet loads the
    folder the card sits in, wherever it has been copied: run it from beside the folder, or
    replace the folder name with its path (or `hf-hub:ORG/NAME` once uploaded). Then the
    lineage and training data (ssl_em.lineage) and the `notes`, as given."""
    from ssl_em.lineage import card_section

    norm, method = meta.norm, (meta.method or "unknown").rsplit(".", 1)[-1]
    pixel = f"{meta.pixel_size_nm:g} nm" if meta.pixel_size_nm else "not recorded (native resolution of the data)"
    tags = ["electron-microscopy", "self-supervised", "ssl_em", "timm", f"ssl-{method.lower()}"]
    front = "\n".join(["---", f"license: {(meta.license or UNSTATED).lower()}", "library_name: timm", "pipeline_tag: image-feature-extraction", "tags:"]
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
| licence | {_license_text(meta.license)} |

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

{card_section(meta)}{chr(10) + notes.strip() + chr(10) if notes.strip() else ""}"""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="a pretraining run dir (uses checkpoints/last.ckpt) or a .ckpt file")
    parser.add_argument("--out", required=True, help="folder to write (e.g. checkpoints/NAME/)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="storage type of the weights (float16 halves the file; loading casts back to float32)")
    parser.add_argument("--method-state", action=argparse.BooleanOptionalAction, default=True,
                        help=f"also write {METHOD_STATE}, the method's decoder/heads, so `ssl-em pretrain --init_from` continues the method (default: yes)")
    parser.add_argument("--notes", metavar="FILE", help="markdown appended to the model card: what was measured, the training data's terms "
                                                        "(keep it beside your recipes, so a re-export writes the same card)")
    parser.add_argument("--license", metavar="ID", help="SPDX licence of the weights, if you can state one (their training data's terms "
                                                         "decide it); without it the card says `license: other` and lists the data")


def run(args) -> int:
    # One writer per artefact: a job script that runs `ssl-em export` on every rank (srun,
    # torchrun) writes the folder once, from rank 0; two ranks swapping one folder race.
    rank = launcher_rank()
    try:
        if rank != 0:
            print(f"ssl-em export: rank {rank}: rank 0 writes {args.out}; nothing to do here")
            return 0
        out = export_run(args.run, args.out, args.dtype, args.method_state, args.notes, args.license)
        print(f"exported {out} (timm.create_model('local-dir:{out}', pretrained=True) loads it)")
        return 0
    finally:  # in a process group, the other ranks return once the export is in place
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
