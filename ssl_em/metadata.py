"""One schema for the metadata files a user may have been sent: a backbone's `ssl_em.json`
(`BackboneMeta`) and a fine-tuned model's `ssl_em_finetuned.json` (`FinetunedMeta`).

Both are read through `check_backbone` / `check_finetuned` before anything is built from
them, so a NaN or zero in `normalization`, an `img_size` of "abc", a `patch_size` of -1 or a
`task` ssl_em does not have is refused on read with one line naming the file and the key,
instead of being copied into a fine-tuned model or turned into NaN probabilities later.
A backbone's recommended fine-tuning settings (`finetune`) are data too: only the
`FINETUNE_KEYS` below, each of a checked type, and never a class path to import.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ssl_em.errors import UserError

Check = tuple[str, Callable[[object], bool]]  # (what the value must be, the test)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _optional(check: Check) -> Check:
    return f"null or {check[0]}", lambda v: v is None or check[1](v)


POSITIVE_INT: Check = ("an integer >= 1", lambda v: _int(v) and v >= 1)
COUNT: Check = ("an integer >= 0", lambda v: _int(v) and v >= 0)
INT: Check = ("an integer", _int)
POSITIVE: Check = ("a finite number > 0", lambda v: _num(v) and v > 0)
NON_NEGATIVE: Check = ("a finite number >= 0", lambda v: _num(v) and v >= 0)
BOOL: Check = ("true or false", lambda v: isinstance(v, bool))
TEXT: Check = ("a string", lambda v: isinstance(v, str))
MAPPING: Check = ("an object", lambda v: isinstance(v, dict))
NORMALIZATION: Check = ("{mean, std} with a finite mean and a finite std > 0",
                        lambda v: isinstance(v, dict) and _num(v.get("mean")) and _num(v.get("std")) and v["std"] > 0)

#: The settings a pretraining method may recommend for fine-tuning its backbone
#: (SegmentationModule arguments of plain types). Heads, classes and paths are not among
#: them: a recipe that could name a class would make `ssl-em finetune` import it.
FINETUNE_KEYS: dict[str, Check] = {
    "unfreeze_at_step": _optional(COUNT),
    "backbone_lr_scale": _optional(POSITIVE),
    "layer_decay": ("a number in (0, 1]", lambda v: _num(v) and 0 < v <= 1),
    "lr": POSITIVE,
    "weight_decay": NON_NEGATIVE,
    "dice_weight": NON_NEGATIVE,
    "warmup_steps": _optional(COUNT),
    "augment": BOOL,
    "strong_augment": BOOL,
    "cosine": BOOL,
}

FINETUNE: Check = ("an object of settings", lambda v: isinstance(v, dict))

BACKBONE: dict[str, Check] = {
    "architecture": TEXT,
    "model_args": MAPPING,
    "in_chans": POSITIVE_INT,
    "img_size": _optional(POSITIVE_INT),
    "patch_size": _optional(POSITIVE_INT),
    "pixel_size_nm": _optional(POSITIVE),
    "normalization": NORMALIZATION,
    "method": _optional(TEXT),
    "recipe": _optional(TEXT),
    "recipe_content": _optional(TEXT),
    "steps": _optional(COUNT),
    "data_fingerprint": _optional(TEXT),
    "finetune": FINETUNE,
    "ssl_em_version": _optional(TEXT),
    "tiles": _optional(COUNT),
    "lineage": ("a list of objects", lambda v: isinstance(v, list) and all(isinstance(a, dict) for a in v)),
    "data_sources": _optional(("a list of objects", lambda v: isinstance(v, list) and all(isinstance(a, dict) for a in v))),
    "license": _optional(TEXT),
}
BACKBONE_REQUIRED = ("architecture",)

TASKS = ("semantic", "instance")
FINETUNED: dict[str, Check] = {
    "task": (f"one of {', '.join(TASKS)}", lambda v: v in TASKS),
    "classes": ("a non-empty list of names", lambda v: isinstance(v, list) and bool(v) and all(isinstance(c, str) for c in v)),
    "backbone": MAPPING,
    "feature_indices": ("a list of integers", lambda v: isinstance(v, list) and all(_int(i) for i in v)),
    "head": MAPPING,
    "tile_size": POSITIVE_INT,
    "backbone_source": TEXT,
    "normalization": NORMALIZATION,
    "ignore_index": INT,
    "label_values": _optional(("a list of integers", lambda v: isinstance(v, list) and all(_int(i) for i in v))),
    "random_init": BOOL,
    "instance": MAPPING,
    "metrics": MAPPING,
    "steps": COUNT,
    "format": TEXT,
    "ssl_em_version": _optional(TEXT),
}
FINETUNED_REQUIRED = ("task", "classes", "backbone", "feature_indices", "head", "tile_size")


def check_fields(d: dict, schema: dict[str, Check], required: tuple[str, ...], where: str, error: type[UserError] = UserError, prefix: str = "") -> dict:
    """`d` when every key of `schema` it holds passes its check and `required` keys are
    there; `error` naming `where` and the first key that fails otherwise. Unknown keys are
    ignored (a newer ssl_em may add fields); they are never used."""
    for key in required:
        if key not in d:
            raise error(f"{where}: no {key!r}; not ssl_em metadata, or written by an incompatible version")
    for key, (what, ok) in schema.items():
        if key in d and not ok(d[key]):
            raise error(f"{where}: {prefix}{key} {d[key]!r} must be {what}")
    return d


def check_finetune_recipe(recipe: dict, where: str, error: type[UserError] = UserError) -> dict:
    """A backbone's `finetune` block: known keys with values of their type, nothing else."""
    foreign = sorted(k for k in recipe if k not in FINETUNE_KEYS)
    if foreign:
        raise error(f"{where}: finetune settings {foreign} are not ones a backbone may recommend ({', '.join(FINETUNE_KEYS)}); "
                    "refusing them (a shared backbone is data, never code)")
    return check_fields(recipe, FINETUNE_KEYS, (), where, error, prefix="finetune.")


def check_backbone(d: dict, where: str, error: type[UserError] = UserError) -> dict:
    """A backbone's metadata (`BackboneMeta.to_dict()` as read from `ssl_em.json`)."""
    check_fields(d, BACKBONE, BACKBONE_REQUIRED, where, error)
    check_finetune_recipe(d.get("finetune") or {}, where, error)
    return d


def check_finetuned(d: dict, where: str, error: type[UserError] = UserError) -> dict:
    """A fine-tuned model's metadata (`FinetunedMeta` as read from `ssl_em_finetuned.json`),
    with the backbone's record inside it."""
    check_fields(d, FINETUNED, FINETUNED_REQUIRED, where, error)
    check_backbone(d["backbone"], f"{where} (backbone)", error)
    return d
