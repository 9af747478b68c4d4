"""Distributed correctness, proved with processes: 2 gloo ranks on CPU, tiny models, each
launch under a timeout so a hang fails (tests/dist_utils.py)."""

from __future__ import annotations

import pytest
import torch
from dist_utils import launch


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """One launch of 2 processes runs every check below (dist_workers.all_checks); each test
    reads what the ranks wrote. The timeout is generous: it is there to catch a hang, and a
    loaded machine starts Python slowly."""
    out = tmp_path_factory.mktemp("ranks")
    launch("dist_workers:all_checks", 2, out, timeout=600, slow=9, barrier_s=6)
    return out


def test_random_draws_differ_by_rank_and_repeat_by_seed(ranks):
    tmp_path = ranks
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


def test_ddp_finetuning_keeps_ranks_equal_and_reduces_val_iou(ranks):
    """2 ranks, frozen for 2 steps then unfrozen (the backbone was not in DDP's buckets when
    it wrapped the model), and trainable from step 0 (a ViT's final norm gets no gradient
    from forward_intermediates): the backbone trains and stays identical on both ranks.
    Validation IoU over both ranks equals one process's IoU over all the tiles."""
    tmp_path = ranks
    r0, r1 = (torch.load(tmp_path / f"finetune{r}.pt", weights_only=True) for r in (0, 1))
    for unfreeze in (2, 0):
        assert r0[unfreeze]["moved"] > 0, f"unfreeze_at_step={unfreeze}: the backbone did not train"
        for k, v in r0[unfreeze]["backbone"].items():
            assert torch.equal(v, r1[unfreeze]["backbone"][k]), f"unfreeze_at_step={unfreeze}: {k} differs between ranks"
    assert r0["val_iou"] == r1["val_iou"]
    assert list(r0["val_iou"].values()) == pytest.approx(r0["one_process_iou"], abs=1e-6)
    assert r0["val_tiles"] + r1["val_tiles"] == 8  # 2 slices x 4 tiles, each scored once


def test_predict_with_instances_leaves_no_rank_waiting(ranks):
    """Rank 0 runs the instance post-processing (slowed by 9 s here); every barrier fails
    after 6 s of waiting. Rank 1 finishes its slabs and leaves; rank 0 completes the store."""
    import zarr

    tmp_path = ranks
    done0, done1 = (torch.load(tmp_path / f"predict_done{r}.pt", weights_only=True) for r in (0, 1))
    assert done1 < done0 - 4  # rank 1 did not wait for rank 0's instances
    root = zarr.open_group(str(tmp_path / "pred.zarr"), mode="r")
    assert root.attrs["ssl_em"]["complete"]
    assert int(root["labels/instances/0"][:].max()) > 0
