"""Label volumes: which z-slices (`parse_slices`), and raw label values as class indices
(`semantic_targets`, -1 = `IGNORE` on unannotated pixels). Fine-tuning reads its targets
through these, and evaluation its ground truth, so both agree on what a label value means."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ssl_em.errors import UserError

IGNORE = -1


class LabelError(UserError):
    """Labels do not fit the images or the classes; the message names files, shapes or values."""


def parse_slices(spec: "str | Sequence[int] | None", n: int, what: str = "slices") -> list[int]:
    """"0,1" / "20-29" (inclusive) / "0,5-7" / [3, 4] / negative ints from the end -> sorted indices.
    `what` names the flag in errors (LabelError)."""
    if spec is None:
        return []
    if isinstance(spec, (int, np.integer)):
        spec = [int(spec)]
    if isinstance(spec, str):
        out: list[int] = []
        for part in (p.strip() for p in spec.split(",") if p.strip()):
            a, sep, b = part.partition("-") if not part.startswith("-") else (part, "", "")
            try:
                first, last = (int(a), int(b)) if sep else (int(a), int(a))
            except ValueError:
                raise LabelError(f"{what} {spec!r}: {part!r} is not a slice number or range like 20-29") from None
            if last < first:  # range() would make it no slices at all, silently
                raise LabelError(f"{what} {spec!r}: range {part!r} runs backwards; write {last}-{first}")
            out += list(range(first, last + 1))
        spec = out
    try:
        idx = sorted({i % n if -n <= i < n else i for i in (int(s) for s in spec)})
    except (TypeError, ValueError):
        raise LabelError(f"{what} {spec!r}: not a list of slice numbers") from None
    bad = [i for i in idx if not 0 <= i < n]
    if bad:
        raise LabelError(f"{what}: slice indices {bad[:10]} outside the volume's {n} z-slices (0..{n - 1})")
    return idx


def semantic_targets(raw: np.ndarray, label_values: Sequence[int], ignore_value: int | None, where: str) -> np.ndarray:
    """Map raw label values to class indices 0..K-1 (and ignore_value to -1); name stray values."""
    lut = {int(v): k for k, v in enumerate(label_values)}
    if ignore_value is not None:
        lut[int(ignore_value)] = IGNORE
    values, inverse = np.unique(raw, return_inverse=True)
    stray = [int(v) for v in values if int(v) not in lut]
    if stray:
        raise LabelError(f"{where}: label values {stray[:10]} are not among the classes' values {list(label_values)} (ignore value: {ignore_value})")
    return np.array([lut[int(v)] for v in values], np.int64)[inverse].reshape(raw.shape)
