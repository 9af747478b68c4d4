"""InfoNCE / NT-Xent against plain references, and across 2 gloo ranks == one big batch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.multiprocessing as mp

from ssl_em.pretrain.losses import info_nce, nt_xent


def ref_info_nce(q, k, t):
    """Loop over queries: -log(exp(s_ii / t) / sum_j exp(s_ij / t)), cosine similarities."""
    total = 0.0
    for i in range(len(q)):
        sims = [torch.dot(q[i], k[j]) / (q[i].norm() * k[j].norm()) / t for j in range(len(k))]
        total = total - (sims[i] - torch.logsumexp(torch.stack(sims), 0))
    return total / len(q)


def ref_nt_xent(z1, z2, t):
    """SimCLR's definition: for each of the 2N views, its partner against all other 2N - 1."""
    z = torch.cat([z1, z2])
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        partner = (i + n) % (2 * n)
        cos = lambda a, b: torch.dot(a, b) / (a.norm() * b.norm())  # noqa: E731
        sims = torch.stack([cos(z[i], z[j]) / t for j in range(2 * n) if j != i])
        total = total - (cos(z[i], z[partner]) / t - torch.logsumexp(sims, 0))
    return total / (2 * n)


def test_info_nce_matches_reference():
    torch.manual_seed(0)
    q, k = torch.randn(6, 5), torch.randn(6, 5)
    assert torch.allclose(info_nce(q, k, 0.2), ref_info_nce(q, k, 0.2), atol=1e-5)


def test_nt_xent_matches_reference():
    torch.manual_seed(0)
    z1, z2 = torch.randn(5, 4), torch.randn(5, 4)
    assert torch.allclose(nt_xent(z1, z2, 0.5), ref_nt_xent(z1, z2, 0.5), atol=1e-5)


def test_perfect_alignment_is_low():
    z = torch.eye(4)
    assert info_nce(z, z, 0.05) < 1e-3
    assert nt_xent(z, z, 0.05) < math.log(3) * 0.01 + 1e-3


# -- two gloo processes == one process with the whole batch ------------------------------

B, D_IN, D = 4, 6, 5


def _problem():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2 * B, D_IN, generator=g), torch.randn(2 * B, D_IN, generator=g), torch.randn(D_IN, D, generator=g)


def _losses(x1, x2, w):
    """Both losses through a shared linear encoder w, so gradients reach w from every sample."""
    return {"info_nce": info_nce(x1 @ w, x2 @ w, 0.2), "nt_xent": nt_xent(x1 @ w, x2 @ w, 0.3)}


def _rank(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    # A file store, not a TCP port picked in advance: nothing can take it in between.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    x1, x2, w0 = _problem()
    local = slice(rank * B, (rank + 1) * B)
    result = {}
    for name in ("info_nce", "nt_xent"):
        w = w0.clone().requires_grad_(True)
        loss = _losses(x1[local], x2[local], w)[name]
        loss.backward()
        # What DDP does: average gradients and (for logging) losses over ranks.
        grad, mean_loss = w.grad.clone(), loss.detach().clone()
        dist.all_reduce(grad)
        dist.all_reduce(mean_loss)
        result[name] = (mean_loss / world, grad / world)
    if rank == 0:
        torch.save(result, out)
    dist.destroy_process_group()


def test_two_ranks_equal_one_big_batch(tmp_path):
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_rank, args=(2, str(tmp_path / "store"), out), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    x1, x2, w0 = _problem()
    for name in ("info_nce", "nt_xent"):
        w = w0.clone().requires_grad_(True)
        loss = _losses(x1, x2, w)[name]
        loss.backward()
        assert torch.allclose(ddp[name][0], loss.detach(), atol=1e-5), name
        assert torch.allclose(ddp[name][1], w.grad, atol=1e-5), name


@pytest.mark.parametrize("name", ["info_nce", "nt_xent"])
def test_logits_are_float32_under_bf16_autocast(name):
    """Under autocast the similarities stay float32: the loss equals the float32 one, where
    a bf16 matmul of the same inputs is off by about 1e-2."""
    x1, x2, w = _problem()
    z1, z2 = x1 @ w, x2 @ w
    loss = {"info_nce": lambda: info_nce(z1, z2, 0.2), "nt_xent": lambda: nt_xent(z1, z2, 0.3)}[name]
    ref = loss()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = loss()
    assert under.dtype == torch.float32
    assert torch.allclose(under, ref, atol=1e-6)
