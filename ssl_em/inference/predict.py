"""`ssl-em predict MODEL INPUT --out OUT.zarr`: sliding-window inference over any volume.

Planes are predicted by `ssl_em.inference.window` (overlapping windows blended without
seams). The volume is processed slab by slab (`--slab` planes at a time), so memory is
bounded by one slab, not by the volume, and each finished slab is recorded in OUT
(`ssl_em.inference.store`, which also describes OUT's layout): after a crash, re-running the
same command skips finished slabs.

`--planes xy,xz,yz` predicts along all three axes and averages; the default, `auto`, does so
when the voxels are near-isotropic (z within 25% of xy) and predicts xy alone otherwise.
Instances: seeded watershed (ssl_em.inference.instance) slice by slice (`--instances 2d`,
memory bounded by a slab), or in 3D (`--instances 3d`) block by block: each block
(`--block`, default 64 x 512 x 512) is segmented with `--halo` voxels of context on every
side, and segments cut by a block boundary are joined afterwards where the two planes on
either side overlap by a mutual majority. Memory is bounded by one block plus its halo.
OUT holding another prediction (other model, input or settings) is refused unless
--overwrite.

Several devices (`--devices N`, also across nodes with `--num-nodes`) share the work through
Lightning Fabric's DDP launcher: every process takes every N-th slab. Slabs are aligned with
the output chunks, so no two processes ever write the same chunk, and each finished slab is
recorded as its own marker file (OUT.zarr/.progress/PLANE/START) rather than in a shared
attribute, so concurrent processes never overwrite each other's record. Instances and the
final "complete" flag are written by rank 0 after every rank has finished its slabs; the
other ranks then exit without waiting for it (no barrier waits on post-processing).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ssl_em import ngff
from ssl_em.atomic import write_atomic
from ssl_em.data.normalize import IntensityStats, Normalization, normalize_numpy, sample_stats
from ssl_em.data.readers.open import as_volume
from ssl_em.data.volume import Volume, check_finite
from ssl_em.errors import UserError, check_at_least, check_parent_folders
from ssl_em.inference.instance import foreground_boundary, merge_map, plane_merges, relabel, segment_slices, watershed_instances
from ssl_em.inference.store import PLANES, PredictSettings, Prediction, PredictionExistsError, model_fingerprint, prediction_identity, read_probabilities, volume_fingerprint
from ssl_em.inference.window import default_precision, predict_planes
from ssl_em.precision import BF16, FP32, Precision, choose


# -- whole volume -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """This process's share of a prediction: items k with k % world == rank.

    Items are dealt by their position in the full list, never in the list of what is left,
    so every rank agrees on the split even while the others are already marking slabs done."""

    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] = field(default=lambda: None, compare=False)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mine(self, items: list) -> list:
        return [item for k, item in enumerate(items) if k % self.world == self.rank]


def predict_volume(
    net: nn.Module,
    volume: Volume,
    out: str | Path,
    classes: list[str],
    normalization: Normalization,
    settings: PredictSettings,
    model_id: str,
    input_id: str | None = None,
    label_values: list[int] | None = None,
    stats: IntensityStats | None = None,
    overwrite: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
    shard: Shard = Shard(),
    precision: Precision | None = None,
) -> Path:
    """Predict `volume` into OUT.zarr slab by slab; resumes where a previous run stopped.

    With several processes, each calls this with its own `shard` (same arguments otherwise).
    precision: autocast and layout (`ssl_em.precision`); None: `default_precision`."""
    from tqdm.auto import tqdm

    precision = precision or default_precision(torch.device(device))
    net = precision.apply(net.to(device)).eval()
    Z, Y, X = volume.shape
    if not 0 <= settings.overlap < settings.window or settings.slab < 1 or settings.batch_size < 1:
        raise UserError(f"overlap {settings.overlap} must be in [0, window {settings.window}), slab {settings.slab} and batch size {settings.batch_size} >= 1")
    stats = stats or sample_stats(volume)  # refuses NaN/Inf before OUT is touched
    identity = prediction_identity(volume, settings, model_id, input_id)
    # Rank 0 creates (or replaces) the store; the others open it once it exists.
    voxel_size = volume.voxel_size if volume.voxel_size_known else None
    pred = Prediction(out, identity, volume.shape, classes, settings, overwrite=overwrite, label_values=label_values, voxel_size=voxel_size) if shard.main else None
    shard.barrier()
    pred = pred or Prediction(out, identity, volume.shape, classes, settings)
    if pred.meta.get("complete"):
        return pred.path
    probs_arr = pred.array("0")
    targets = {"xy": probs_arr} | {p: pred.root["planes"][p]["0"] for p in settings.planes if p != "xy"}
    bar = not progress or not shard.main
    for plane in settings.planes:
        axis, n, s = PLANES[plane], volume.shape[PLANES[plane]], settings.slab
        done = pred.done(plane)
        todo = [i for i in shard.mine(list(range(0, n, s))) if i not in done]

        def load(start: int, axis=axis, n=n, plane=plane):
            """Reader thread: one slab's planes, read, checked and standardised: (n, a, b)."""
            region = [slice(None)] * 3
            region[axis] = slice(start, min(start + s, n))
            raw = volume.read(*region)
            check_finite(raw, f"{volume.path} ({plane} planes {start}..{region[axis].stop - 1})")
            return tuple(region), normalize_numpy(np.moveaxis(raw, axis, 0), stats, normalization)

        def store(region: tuple, start: int, slab: np.ndarray, plane=plane) -> None:
            """Writer thread: a slab's probabilities (and labels), then its progress marker."""
            targets[plane][(slice(None), *region)] = ngff.encode_probabilities(slab)
            if plane == "xy" and len(settings.planes) == 1:
                labels = pred.array("labels/semantic/0")
                labels[region] = _semantic(slab).astype(labels.dtype)
            pred.mark(plane, start, shard.rank)

        # The network runs here while one thread reads the next slab and another writes the
        # previous one (numpy, PNG/TIFF decoding and zarr's compressors release the GIL): at
        # most three slabs in memory. The writer is waited for before the next write is
        # queued and before leaving, so an error or a crash surfaces here and every slab
        # marked done was written.
        with ThreadPoolExecutor(1, thread_name_prefix="predict-read") as reader, ThreadPoolExecutor(1, thread_name_prefix="predict-write") as writer:
            ahead, written = (reader.submit(load, todo[0]) if todo else None), None
            for k, start in enumerate(tqdm(todo, desc=f"predict {plane}", unit="slab", disable=bar)):
                region, planes = ahead.result()
                ahead = reader.submit(load, todo[k + 1]) if k + 1 < len(todo) else None
                slab = np.moveaxis(predict_planes(net, planes, settings.window, settings.overlap, settings.batch_size, device, precision), 1, 1 + axis)
                if written is not None:
                    written.result()
                written = writer.submit(store, region, start, slab)
            if written is not None:
                written.result()
    shard.barrier()  # every plane is written before any z slab is averaged
    if len(settings.planes) > 1:  # average the planes into the image, slab by slab along z
        done = pred.done("combine")
        for start in tqdm([z for z in shard.mine(list(range(0, Z, settings.slab))) if z not in done], desc="combine planes", disable=bar):
            zs = slice(start, min(start + settings.slab, Z))
            mean = sum(read_probabilities(targets[p], (slice(None), zs)) for p in settings.planes) / len(settings.planes)
            probs_arr[:, zs] = ngff.encode_probabilities(mean)
            labels = pred.array("labels/semantic/0")
            labels[zs] = _semantic(mean).astype(labels.dtype)
            pred.mark("combine", start, shard.rank)
        shard.barrier()
    if not shard.main:
        # The instances (a 3D watershed can take hours) and the "complete" flag are rank 0's
        # alone: the others are done and leave now, rather than wait at a barrier that would
        # outlast the process group's timeout. Only rank 0 reports.
        return pred.path
    if settings.instances:
        _instances(pred, settings, progress)
    pred.update(complete=True)
    return pred.path


def _semantic(probs: np.ndarray) -> np.ndarray:
    """(K, ...) probabilities -> stored labels: argmax + LABEL_OFFSET (int64)."""
    return probs.argmax(0) + ngff.LABEL_OFFSET


def _instances(pred: Prediction, settings: PredictSettings, progress: bool) -> None:
    """Watershed on (foreground, boundary): 2d slab by slab with a running id offset, or 3d
    block by block (`_instances_3d`)."""
    from tqdm.auto import tqdm

    if settings.instances == "3d":
        _instances_3d(pred, settings, progress)
        return
    probs, ids = pred.array("0"), pred.array("labels/instances/0")
    Z = probs.shape[1]
    kw = {"seed_threshold": settings.seed_threshold, "min_size": settings.min_size}
    for start in tqdm([z for z in range(0, Z, settings.slab) if z not in pred.done("instances")], desc="instances", disable=not progress):
        zs = slice(start, min(start + settings.slab, Z))
        fg, bd = foreground_boundary(read_probabilities(probs, (slice(None), zs)))
        _store_instances(pred, ids, zs, segment_slices(fg, bd, **kw), start)


def _store_instances(pred: Prediction, ids, region, seg: np.ndarray, item: int) -> None:
    """Write `seg` (ids from 1) into `ids[region]` after the running offset, so ids stay
    unique across slabs or blocks. The offset moves before the item is marked done: a crash
    in between redoes it with fresh ids (a gap in the numbering), never with used ones."""
    offset = int(pred.meta.get("instance_offset", 0))
    ids[region] = np.where(seg > 0, seg + offset, 0)
    pred.update(instance_offset=offset + int(seg.max()))
    pred.mark("instances", item)


def _instances_3d(pred: Prediction, settings: PredictSettings, progress: bool) -> None:
    """3D watershed per block (with a halo of context), ids made unique by a running offset;
    then segments cut by block boundaries are joined (`plane_merges` over every boundary
    plane, `merge_map`), and the blocks relabelled. Every step resumes after a crash."""
    from tqdm.auto import tqdm

    probs, ids = pred.array("0"), pred.array("labels/instances/0")
    shape, size, h = probs.shape[1:], settings.block, settings.halo
    kw = {"seed_threshold": settings.seed_threshold, "min_size": settings.min_size}
    cores = [tuple(slice(o, min(o + b, n)) for o, b, n in zip(origin, size, shape))
             for origin in itertools.product(*(range(0, n, b) for n, b in zip(shape, size)))]
    done = pred.done("instances")
    for k in tqdm([k for k in range(len(cores)) if k not in done], desc="instances 3d", unit="block", disable=not progress):
        core = cores[k]
        outer = tuple(slice(max(0, c.start - h), min(n, c.stop + h)) for c, n in zip(core, shape))
        fg, bd = foreground_boundary(read_probabilities(probs, (slice(None), *outer)))
        seg = watershed_instances(fg, bd, **kw)[tuple(slice(c.start - o.start, c.stop - o.start) for c, o in zip(core, outer))]
        _store_instances(pred, ids, core, seg, k)
    # The joins are computed once and kept, so a resumed relabelling uses the same ones.
    merges_file = pred.progress / "instance_merges.json"
    if not merges_file.is_file():
        pairs = []
        for axis in range(3):
            for c in range(size[axis], shape[axis], size[axis]):
                before, after = [slice(None)] * 3, [slice(None)] * 3
                before[axis], after[axis] = c - 1, c
                pairs += plane_merges(ids[tuple(before)], ids[tuple(after)])
        write_atomic(merges_file, json.dumps({str(a): b for a, b in merge_map(pairs).items()}))  # never half a file
    mapping = {int(a): b for a, b in json.loads(merges_file.read_text()).items()}
    done = pred.done("join")
    for k in tqdm([k for k in range(len(cores)) if k not in done], desc="join blocks", unit="block", disable=not progress or not mapping):
        ids[cores[k]] = relabel(ids[cores[k]], mapping)  # idempotent: a crash midway is harmless
        pred.mark("join", k)


# -- command line ---------------------------------------------------------------------------------


def _zyx(text: str) -> tuple[int, int, int]:
    try:
        zyx = tuple(int(v) for v in text.split(","))
    except ValueError:
        zyx = ()
    if len(zyx) != 3 or min(zyx) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give three positive sizes z,y,x, e.g. 64,512,512")
    return zyx


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"{text!r}: give true or false")
    return text.lower() in ("true", "1", "yes")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a fine-tuned model folder (from `ssl-em finetune --out`)")
    parser.add_argument("input", help="the volume: any format ssl_em reads (HDF5 as file.h5:/dataset)")
    parser.add_argument("--out", required=True, help="OME-Zarr to write (OUT.zarr)")
    parser.add_argument("--window", type=int, default=None, help="window side in px (default: the model's tile size)")
    parser.add_argument("--overlap", type=int, default=None, help="overlap between windows in px (default: window / 4)")
    parser.add_argument("--slab", type=int, default=8, help="planes per slab: memory and resume granularity")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--planes", default="auto", help="xy, or xy,xz,yz to average orthogonal planes; auto (default): all three when the voxels are near-isotropic (z within 25%% of xy), else xy")
    parser.add_argument("--instances", choices=["none", "2d", "3d"], default=None, help="instance segmentation (default: 2d for instance models, none otherwise)")
    parser.add_argument("--min-size", type=int, default=16, help="instance fragments smaller than this are merged into neighbours")
    parser.add_argument("--seed-threshold", type=float, default=0.5,
                        help="watershed seeds: foreground - boundary above this (3D needs more, e.g. 0.9: thin boundaries leak between sections)")
    parser.add_argument("--block", type=_zyx, default=(64, 512, 512), help="3D instances: z,y,x block segmented at once (memory: one block plus halo)")
    parser.add_argument("--halo", type=int, default=8, help="3D instances: voxels of context around each block")
    parser.add_argument("--voxel-size", default=None, help="z,y,x nm (overrides the file)")
    parser.add_argument("--accelerator", default="auto", help="cpu, cuda, ... (Lightning's names; default: what is there)")
    parser.add_argument("--devices", default="1", help="devices per node sharing the work (a number, or -1 for all)")
    parser.add_argument("--num-nodes", type=int, default=1, help="nodes sharing the work (launch one process per node, as for Lightning training)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier prediction at OUT (of another model, input or settings); nothing else is ever replaced")
    parser.add_argument("--precision", choices=[FP32, BF16], default=None, help="32-true or bf16-mixed (default: bf16 autocast where the CPU or GPU has bf16 units, ssl_em.precision)")
    parser.add_argument("--channels_last", "--channels-last", type=_bool, default=None, metavar="true|false", help="NHWC layout (default: ssl_em.precision decides)")
    parser.add_argument("--no-progress", action="store_true")


def default_planes(volume: Volume) -> tuple[str, ...]:
    """xy, xz and yz for near-isotropic voxels (FIB-SEM: every plane looks like EM, and
    averaging three views smooths each one's errors), xy alone otherwise or when the voxel
    size is unknown (serial sections: xz and yz views are smeared along z)."""
    return ("xy", "xz", "yz") if volume.near_isotropic else ("xy",)


def launch(accelerator: str, devices: str, num_nodes: int) -> tuple[Shard, torch.device]:
    """Start the processes that share a prediction (Lightning Fabric; one per device) and
    return this process's shard and device. With one device nothing is started."""
    from lightning_fabric import Fabric

    fabric = Fabric(accelerator=accelerator, devices=int(devices) if devices.lstrip("-").isdigit() else devices, num_nodes=num_nodes)
    fabric.launch()  # ranks > 0 re-run this command from the top, then everyone continues here
    return Shard(fabric.global_rank, fabric.world_size, fabric.barrier), fabric.device


def check_flags(args) -> None:
    """UserError naming the flag, before the model or the volume is opened."""
    check_at_least(1, {"--window": args.window, "--slab": args.slab, "--batch-size": args.batch_size, "--num-nodes": args.num_nodes})
    check_at_least(0, {"--min-size": args.min_size, "--halo": args.halo})
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; give a folder (OUT.zarr)")
    check_parent_folders(out, f"--out {out}")


def check_out_is_not_a_source(out: Path, sources: dict[str, Path]) -> None:
    """UserError when --out is (or holds) the model or the input: replacing it would
    delete what the prediction is made from."""
    target = out.resolve()
    for what, source in sources.items():
        src = source.resolve()
        if src == target or target in src.parents:
            raise UserError(f"--out {out}: is the {what} {source} or holds it; choose another --out")


def run(args) -> int:
    import sys

    from ssl_em.finetune.model_folder import load_finetuned

    check_flags(args)
    net, meta = load_finetuned(args.model, device="cpu")  # errors name the file: one line from `ssl-em`
    volume = as_volume(args.input, args.voxel_size)
    window = args.window or meta.tile_size
    if args.overlap is not None and not 0 <= args.overlap < window:
        raise UserError(f"--overlap {args.overlap}: must be >= 0 and smaller than the window ({window} px)")
    instances = args.instances if args.instances is not None else ("2d" if meta.task == "instance" else "none")
    settings = PredictSettings(
        window=window,
        overlap=args.overlap if args.overlap is not None else window // 4,
        slab=args.slab,
        batch_size=args.batch_size,
        planes=default_planes(volume) if args.planes == "auto" else tuple(p.strip() for p in args.planes.split(",")),
        instances=None if instances == "none" else instances,
        min_size=args.min_size,
        seed_threshold=args.seed_threshold,
        block=args.block,
        halo=args.halo,
    )
    multiple = net.extractor.spec.input_multiple
    fixed = meta.backbone_meta.model_args.get("img_size") if getattr(net.extractor.backbone, "patch_embed", None) is not None else None
    if window % multiple or fixed not in (None, window):
        need = f"equal to the model's tile size {fixed}" if fixed not in (None, window) else f"a multiple of {multiple}"
        print(f"ssl-em predict: error: --window {window} must be {need} for this model", file=sys.stderr)
        return 2
    if settings.halo < 0:
        print(f"ssl-em predict: error: --halo {args.halo} must be >= 0", file=sys.stderr)
        return 2
    bad = [p for p in settings.planes if p not in PLANES] + ([] if settings.planes[0] == "xy" else ["(xy must come first)"])
    if bad:
        print(f"ssl-em predict: error: --planes {args.planes}: unknown {bad}; use xy or xy,xz,yz", file=sys.stderr)
        return 2
    source = Path(args.input) if Path(args.input).exists() else Path(str(args.input).rsplit(":", 1)[0])  # file.h5:/dataset, store.zarr:1
    check_out_is_not_a_source(Path(args.out), {"model": Path(args.model), "input": source})
    model_id, input_id = model_fingerprint(args.model), volume_fingerprint(volume, args.input)
    try:
        # Refuse before any process starts: a refusal inside one rank would leave the others
        # waiting at a barrier.
        Prediction.check(args.out, prediction_identity(volume, settings, model_id, input_id), args.overwrite)
    except PredictionExistsError as e:
        print(f"ssl-em predict: error: {e}", file=sys.stderr)
        return 2
    shard, device = launch(args.accelerator, args.devices, args.num_nodes)
    chosen = choose(device.type, args.precision, args.channels_last, net)
    if shard.main:
        print(f"ssl-em predict: precision {chosen.why}", flush=True)
    out = predict_volume(net, volume, args.out, meta.classes, meta.norm, settings, model_id, input_id, meta.label_values,
                         overwrite=args.overwrite, device=device, progress=not args.no_progress, shard=shard, precision=chosen)
    if shard.main:
        # Where the raw image lies, for tools that read it beside the labels (`ssl-em measure`).
        pred = Prediction(out, prediction_identity(volume, settings, model_id, input_id), volume.shape, meta.classes, settings)
        pred.update(source=os.path.abspath(args.input) if Path(args.input.split(":/")[0]).exists() else args.input)
        print(f"wrote {out} (open in napari with napari-ome-zarr)")
        if not volume.voxel_size_known:
            print(f"ssl-em predict: {args.input} records no voxel size: {out} has a scale of 1 per voxel and no unit "
                  "(--voxel-size z,y,x in nm sets one)")
    return 0
