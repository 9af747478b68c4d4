"""Contrastive losses with negatives from every rank.

`gather` concatenates a tensor from all ranks with autograd (the backward pass sends each
rank the gradient of every rank's loss with respect to its own samples), so with DDP's
gradient averaging, W ranks x B samples train exactly like one process with W*B samples.
Outside torch.distributed it is the identity. NT-Xent is lightly's; MoCo v3's InfoNCE is
ours, because lightly has no query-against-keys loss without same-view negatives (its
NTXentLoss adds them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_em.seeding import process_group


def gather(x: torch.Tensor) -> torch.Tensor:
    """x: (B, ...) on each rank, same B everywhere -> (W*B, ...), rank-major, differentiable:
    lightly's all-gather, whose backward sums every rank's gradient for this rank's slice (it
    replaced our own autograd function of the same two lines; tests/test_pretrain_losses.py
    checks 2 gloo ranks against one process with the whole batch)."""
    _, w = process_group(launcher=False)
    if w == 1:
        return x
    from lightly.utils.dist import gather as all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def _float32(x: torch.Tensor):
    """Autocast off: similarities of unit vectors divided by a small temperature lose the
    ranking of near negatives in bf16, so the logits are float32 as in the reference code."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def info_nce(query: torch.Tensor, key: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE (MoCo v3): each query's positive is the key of the same sample; the keys of all
    other samples on all ranks are its negatives.

    query, key: (B, D) on this rank (need not be normalised). Returns the mean over local
    queries of -log softmax(q . k+ / t) over the W*B keys.
    """
    rank, _ = process_group(launcher=False)
    with _float32(query):
        q, k = F.normalize(query.float(), dim=1), F.normalize(gather(key).float(), dim=1)
        logits = q @ k.T / temperature  # (B, W*B)
        labels = torch.arange(q.shape[0], device=q.device) + rank * q.shape[0]
        return F.cross_entropy(logits, labels)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent (SimCLR): 2N samples over all ranks; each one's positive is its other view, the
    other 2N - 2 are negatives. lightly's `NTXentLoss` (negatives gathered from every rank),
    in float32.

    z1, z2: (B, D), the two views of the same B samples on this rank. Returns the mean over
    the 2B local samples.
    """
    from lightly.loss import NTXentLoss

    with _float32(z1):
        return NTXentLoss(temperature, gather_distributed=True)(z1.float(), z2.float())
