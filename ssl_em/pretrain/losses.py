"""Contrastive losses with negatives from every rank.

`gather` concatenates a tensor from all ranks with autograd (the backward pass sends each
rank the gradient of every rank's loss with respect to its own samples), so with DDP's
gradient averaging, W ranks x B samples train exactly like one process with W*B samples.
Outside torch.distributed it is the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ssl_em.seeding import process_group


class _Gather(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient for this rank's slice.

    torch.distributed.nn.functional.all_gather does the same but is deprecated, and on
    torch 2.15 with gloo it left a thread that aborted the process at exit.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, w = process_group(launcher=False)
        ctx.rank, ctx.batch = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(w)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # Every rank's loss depends on this rank's samples: sum those gradients here.
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.batch : (ctx.rank + 1) * ctx.batch]


def gather(x: torch.Tensor) -> torch.Tensor:
    """x: (B, ...) on each rank, same B everywhere -> (W*B, ...), rank-major, differentiable."""
    _, w = process_group(launcher=False)
    if w == 1:
        return x
    return _Gather.apply(x)


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
    other 2N - 2 are negatives.

    z1, z2: (B, D), the two views of the same B samples on this rank. Returns the mean over
    the 2B local samples.
    """
    rank, w = process_group(launcher=False)
    B = z1.shape[0]
    with _float32(z1):
        local = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2B, D): view 1 then view 2
        every = F.normalize(torch.cat([gather(z1), gather(z2)]).float(), dim=1)  # (2WB, D)
        logits = local @ every.T / temperature  # (2B, 2WB)
        idx = torch.arange(B, device=z1.device) + rank * B  # this rank's samples in each half
        own = torch.cat([idx, idx + w * B])  # each local row's own column
        partner = torch.cat([idx + w * B, idx])  # its other view's column
        logits = logits.masked_fill(F.one_hot(own, logits.shape[1]).bool(), float("-inf"))
        return F.cross_entropy(logits, partner)
