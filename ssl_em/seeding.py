"""Random numbers per (seed, rank, worker): every process draws its own, reproducibly.

Lightning's `seed_everything(s)` seeds every rank's global RNG with the same s, so anything
that draws from the global RNG (MAE masks, augmentation parameters, random tiles) repeats on
every GPU. Code that draws random numbers holds a `Generators` instead: a torch.Generator per
device, created on first use in each process and seeded from (run seed, stream, rank, loader
worker). The run seed is the one `seed_everything` recorded (PL_GLOBAL_SEED, inherited by DDP
and loader processes), so a run repeats for a seed and every rank and worker differs.
"""

from __future__ import annotations

import os
import zlib

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import get_worker_info


def derive_seed(*keys: int) -> int:
    """A 63-bit seed mixing non-negative integer keys (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> 1)


def run_seed() -> int:
    """The run's seed: what `seed_everything` set (same on every rank), else torch's initial seed."""
    s = os.environ.get("PL_GLOBAL_SEED")
    return int(s) if s is not None else torch.initial_seed()


def process_group(launcher: bool = True) -> tuple[int, int]:
    """(global rank, number of processes): torch.distributed's once it is initialised; else,
    with `launcher`, the launcher's RANK and WORLD_SIZE (a process before the group exists, or
    a DataLoader worker, still knows its place); else (0, 1). Collectives (the losses' gather)
    pass launcher=False: there is nothing to gather from before the group is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if launcher:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return 0, 1


def process_rank() -> int:
    """This process's global rank (`process_group`)."""
    return process_group()[0]


def launcher_rank() -> int:
    """This process's rank when a launcher started several: torch.distributed's, torchrun's
    RANK, or srun's SLURM_PROCID for a plain command run on every task of a job; else 0."""
    if "RANK" not in os.environ and not (dist.is_available() and dist.is_initialized()):
        return int(os.environ.get("SLURM_PROCID", 0))
    return process_rank()


def process_world() -> int:
    """The number of processes (`process_group`)."""
    return process_group()[1]


def worker_index() -> int:
    """0 in the main process, 1 + the DataLoader worker id in a loader worker."""
    info = get_worker_info()
    return 0 if info is None else info.id + 1


def stream_id(name: str) -> int:
    """A stable integer for a stream name, so two modules never share a sequence."""
    return zlib.crc32(name.encode())


class Generators:
    """torch.Generators for one named stream, one per device, seeded on first use from
    (seed, stream, rank, worker). `seed` None = the run seed at first use.

    `at_step(s)` (called by pretraining before every optimizer step) re-keys the stream with
    the step, so the draws of step s are a function of (seed, stream, rank, worker, s): a
    resumed run draws exactly what an uninterrupted one would, with no state to checkpoint.
    """

    def __init__(self, stream: str, seed: int | None = None) -> None:
        self.stream, self.seed = stream, seed
        self.step: int | tuple[int, int] | None = None  # optimizer step, or (step, micro-batch)
        self._by_device: dict[str, torch.Generator] = {}
        self._owner: tuple[int, int, int] | None = None  # (pid, rank, worker) they were made in

    def key(self) -> tuple[int, ...]:
        """(seed, stream, rank, worker[, step]) of this process."""
        seed = self.seed if self.seed is not None else run_seed()
        base = (seed, stream_id(self.stream), process_rank(), worker_index())
        if self.step is None:
            return base
        return (*base, *self.step) if isinstance(self.step, tuple) else (*base, self.step)

    def at_step(self, step: int, micro: int = 0) -> None:
        """Draw from the sequence of optimizer step `step` from now on; `micro`: which
        micro-batch of the step, under gradient accumulation (each gets its own draws)."""
        self.step = int(step) if not micro else (int(step), int(micro))
        self._by_device, self._owner = {}, None

    def get(self, device: torch.device | str = "cpu") -> torch.Generator:
        # A module pickled into a loader worker, or built before torch.distributed started,
        # must not keep the generator of the process or rank it came from.
        owner = (os.getpid(), process_rank(), worker_index())
        if owner != self._owner:
            self._by_device, self._owner = {}, owner
        device = torch.device(device)
        name = str(device)
        if name not in self._by_device:
            g = torch.Generator(device=device)
            g.manual_seed(derive_seed(*self.key()))
            self._by_device[name] = g
        return self._by_device[name]

    def reset(self, seed: int | None = None) -> None:
        """Start the sequence again (from `seed` if given)."""
        if seed is not None:
            self.seed = seed
        self._by_device, self._owner = {}, None

    def __getstate__(self) -> dict:
        # Generators do not pickle; a copy in another process seeds its own.
        return {"stream": self.stream, "seed": self.seed, "step": self.step, "_by_device": {}, "_owner": None}


def seed_process(seed: int | None = None, step: int | None = None, micro: int = 0) -> int:
    """Re-seed this process's global RNGs (torch, numpy, random) from (seed, rank[, step
    [, micro-batch]]), so what still draws from them (dropout, drop-path) differs between
    ranks and micro-batches and, keyed by the optimizer step, repeats exactly after a
    resume. Returns the seed."""
    import random

    keys = (seed if seed is not None else run_seed(), process_rank(), 0x5EED) + (() if step is None else (int(step),)) + ((int(micro),) if micro else ())
    s = derive_seed(*keys)
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)
    return s


def generators_in(module: torch.nn.Module) -> list[Generators]:
    """Every `Generators` held by `module` or its submodules (as attributes)."""
    return [v for m in module.modules() for v in vars(m).values() if isinstance(v, Generators)]
