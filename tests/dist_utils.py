"""Run a function on N gloo processes (CPU), each a fresh interpreter, under a timeout, so
a hang fails the test instead of blocking CI.

`launch("module:function", world, tmp_path, timeout, **kw)` calls function(rank, world, kw)
on each rank after `init_process_group("gloo")` with a file store; kw must be JSON-able.
Each function writes what it found under kw["out"]; the test reads it back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

_BOOT = """
import faulthandler
faulthandler.dump_traceback_later({dump}, exit=False)  # where a hung rank is stuck, before the kill
import json, sys, torch, torch.distributed as dist
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
mod, fn = {target!r}.split(":")
rank, world, kw = {rank}, {world}, json.loads({kw!r})
dist.init_process_group("gloo", init_method="file://" + kw["store"], rank=rank, world_size=world)
getattr(__import__(mod), fn)(rank, world, kw)
dist.barrier()
dist.destroy_process_group()
"""


def launch(target: str, world: int, tmp_path: Path, timeout: float = 60, env: dict | None = None, **kw) -> list[str]:
    """Start `world` processes running `target`; returns their stderr. Fails on a non-zero
    exit or when any is still running after `timeout` seconds (all are killed)."""
    kw = {"store": str(tmp_path / f"store-{target.replace(':', '-')}"), "out": str(tmp_path), **kw}
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511", "NODE_RANK": "0", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")]), **(env or {})}
    procs = []
    for r in range(world):
        code = _BOOT.format(dump=max(1.0, timeout - 3), tests=str(TESTS), target=target, rank=r, world=world, kw=json.dumps(kw))
        # What torchrun sets: ssl_em.seeding falls back on RANK / WORLD_SIZE, and Lightning
        # takes LOCAL_RANK as a sign that the processes were started for it.
        procs.append(subprocess.Popen([sys.executable, "-c", code], env={**base, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world)},
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    errs = []
    try:
        for p in procs:
            errs.append(p.communicate(timeout=timeout)[1])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        tails = "\n".join(f"rank {r}: {p.communicate()[1][-1500:]}" for r, p in enumerate(procs))
        raise AssertionError(f"{target} on {world} processes still running after {timeout} s (a hang)\n{tails}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    codes = [p.returncode for p in procs]
    assert codes == [0] * world, f"{target}: exit codes {codes}\n" + "\n".join(e[-2000:] for e in errs)
    return errs
