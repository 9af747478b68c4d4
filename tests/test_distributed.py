"""Distributed correctness, proved with processes: 2 gloo ranks on CPU, tiny models, each
launch under a timeout so a hang fails (tests/dist_utils.py)."""

from __future__ import annotations

import pytest
import torch
from dist_utils import launch


def test_random_draws_differ_by_rank_and_repeat_by_seed(tmp_path):
    launch("dist_workers:random_draws", 2, tmp_path, timeout=120)
    r0, r1 = (torch.load(tmp_path / f"draws{r}.pt", weights_only=True) for r in (0, 1))
    for key in ("view", "mask", "tiles", "global"):
        assert torch.equal(r0[0][key], r0[1][key]), f"{key}: the same seed must repeat"
        assert torch.equal(r1[0][key], r1[1][key]), f"{key}: the same seed must repeat"
        assert not torch.equal(r0[0][key], r1[0][key]), f"{key}: two ranks drew the same numbers"
        assert not torch.equal(r0[0][key], r0[2][key]), f"{key}: another seed drew the same numbers"
    # A new epoch draws new tiles.
    assert not torch.equal(r0[0]["tiles"], r0[0]["tiles_epoch2"])
    # Masks keep their ratio.
    assert r0[0]["mask"].sum(1).unique().tolist() == [r0[0]["mask"].shape[1] * 3 // 4]
