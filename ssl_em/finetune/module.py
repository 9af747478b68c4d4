"""`SegmentationModule`: a timm backbone + a light head, trained on few labeled tiles.

The module receives its parts through the constructor (LightningCLI reads the typed
signature as the config schema):

- backbone: an exported folder (`checkpoints/NAME`), a timm name (random weights), or an
  nn.Module; `random_init` swaps an exported backbone for the same architecture with fresh
  weights, the like-for-like baseline of the label-efficiency benchmark.
- head: a factory `head(spec, num_classes) -> nn.Module`; in YAML a class path with the
  hyper-parameters as init_args (spec and num_classes come from the backbone and data).
- freeze policy: `unfreeze_at_step` None keeps the backbone frozen throughout (linear probe,
  frozen features); N trains the head alone for N steps, then everything; 0 trains all
  from the start. `layer_decay` < 1 scales each backbone layer's lr by decay^(depth from the
  top) (timm's group matcher, ViTs and CNNs alike); `backbone_lr_scale` scales all of it.
  Its default (None) is 0.1 for a pretrained backbone, whose features should move gently,
  and 1.0 for random init, which has nothing to preserve: a baseline slowed 10x would make
  pretraining look better than it is.

Batches arrive as {"image": (B, 1, H, W) stretched to [0, 1], "target": (B, H, W) int64,
-1 = ignore}; `on_after_batch_transfer` standardises with the backbone's (mean, std) and
augments on the device (dihedral flips, and with `strong_augment` a small affine + elastic
warp of image and labels together, blur and knife-mark stripes, on top of brightness,
contrast, gamma and noise). Loss: cross-entropy + `dice_weight` x soft Dice over labeled
pixels (Dice keeps a rare class from being ignored). The lr warms up linearly over
`warmup_steps` (default 5% of the run) then, with `cosine`, decays to 1% of its peak. Logged: train/loss, val/loss, val/iou (mean over classes), val/iou_<class>.

semi_supervised: a mean teacher (`ssl_em.finetune.semi`, an EMA of the whole network with
`teacher_momentum`, `ssl_em.ema`) labels the batch's unlabeled tiles ("unlabeled": (B, 1,
H, W), from the data module's unlabeled slices) where its confidence reaches `confidence`,
and the student learns those labels on a strong view, weighted by `consistency_weight`
ramped up over the first `consistency_rampup` fraction of the run. The unlabeled tiles get
augmentations of their own random streams, so the labeled tiles are augmented exactly as
without them. Also logged then: train/supervised, train/consistency, train/confident
(fraction of unlabeled pixels with a pseudo-label).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassConfusionMatrix

from ssl_em.backbones import BackboneError, BackboneMeta, patch_size_of, resolve_backbone
from ssl_em.data.augment import BrightnessContrast, FlipRot90, Gamma, GaussianBlur, GaussianNoise, RandomWarp, Stripes
from ssl_em.data.normalize import Normalization
from ssl_em.ema import ema_update_, frozen_copy
from ssl_em.errors import UserError
from ssl_em.features import FeatureExtractor, FeatureSpec
from ssl_em.finetune.heads import LinearProbe
from ssl_em.finetune.model_folder import FinetunedMeta, SegmentationNet, export_finetuned, head_config
from ssl_em.finetune.semi import consistency_loss, pseudo_labels, sigmoid_rampup
from ssl_em.inference.metrics import iou_dice
from ssl_em.schedules import warmup_cosine

HeadFactory = Callable[[FeatureSpec, int], nn.Module]
#: The cosine decays the lr to this fraction of its peak.
COSINE_FLOOR = 0.01


def dice_sums(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft Dice's per-class sums over labeled pixels: (intersection (K,), denominator (K,)).
    logits: (B, K, H, W); target: (B, H, W) with ignore. Sums add up over batches and ranks."""
    valid = (target != ignore_index).unsqueeze(1).to(logits.dtype)  # (B, 1, H, W)
    probs = logits.softmax(1) * valid
    onehot = F.one_hot(target.clamp(min=0), logits.shape[1]).permute(0, 3, 1, 2).to(logits.dtype) * valid
    return (probs * onehot).sum((0, 2, 3)), probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))


def soft_dice_from_sums(inter: torch.Tensor, denom: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - mean over classes of (2 inter + eps) / (denom + eps)."""
    return 1 - ((2 * inter + eps) / (denom + eps)).mean()


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -1, eps: float = 1.0) -> torch.Tensor:
    """1 - mean over classes of soft Dice. logits: (B, K, H, W); target: (B, H, W) with ignore."""
    return soft_dice_from_sums(*dice_sums(logits, target, ignore_index), eps)


def em_augmentations(strong: bool, ignore_index: int, stream: str = "") -> tuple[FlipRot90, RandomWarp | None, nn.Sequential]:
    """(dihedral flips/rotations, affine + elastic warp or None, intensity chain): the
    fine-tuning augmentations. `stream` suffixes every random stream's name, so a second set
    (the unlabeled tiles') draws independently of the first."""
    name = lambda cls: f"{cls.__name__}{stream}" if stream else None  # noqa: E731
    warp = RandomWarp(p=0.5, ignore_index=ignore_index, stream=name(RandomWarp)) if strong else None
    extra = [GaussianBlur((0.1, 1.0), p=0.2, stream=name(GaussianBlur)), Stripes(p=0.1, stream=name(Stripes))] if strong else []
    intensity = nn.Sequential(BrightnessContrast(0.2, 0.2, p=0.8, stream=name(BrightnessContrast)), Gamma(1.4, p=0.3, stream=name(Gamma)),
                              GaussianNoise(0.1, p=0.3, stream=name(GaussianNoise)), *extra)  # fmt: skip
    return FlipRot90(stream=name(FlipRot90)), warp, intensity


class SegmentationModule(pl.LightningModule):
    def __init__(
        self,
        backbone: str | Path | nn.Module = "test_vit",
        head: HeadFactory = LinearProbe,
        num_classes: int = 2,
        classes: list[str] | None = None,
        task: str = "semantic",
        ignore_index: int = -1,
        random_init: bool = False,
        tile_size: int | None = None,
        feature_indices: list[int] | None = None,
        normalization: dict | None = None,
        unfreeze_at_step: int | None = None,
        lr: float = 1e-3,
        backbone_lr_scale: float | None = None,
        layer_decay: float = 1.0,
        weight_decay: float = 1e-4,
        dice_weight: float = 1.0,
        augment: bool = True,
        strong_augment: bool = True,
        warmup_steps: int | None = None,
        cosine: bool = True,
        semi_supervised: bool = False,
        teacher_momentum: float = 0.99,
        confidence: float = 0.9,
        consistency_weight: float = 1.0,
        consistency_rampup: float = 0.4,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone", "head"])
        if isinstance(backbone, nn.Module):
            model, meta = backbone, module_meta(backbone)
        else:
            model, meta = resolve_backbone(backbone, random_init=random_init, tile_size=tile_size)
        self.backbone_meta, self.backbone_source = meta, str(backbone) if not isinstance(backbone, nn.Module) else "<module>"
        self.normalization = Normalization.from_dict(normalization) if normalization else meta.norm
        extractor = FeatureExtractor(model, indices=feature_indices)
        if extractor.spec.in_chans != 1:
            raise BackboneError(f"backbone {meta.architecture} takes {extractor.spec.in_chans} input channels; EM images are grayscale (in_chans=1)")
        self.net = SegmentationNet(extractor, head(extractor.spec, num_classes))
        self.classes = list(classes) if classes else [str(k) for k in range(num_classes)]
        if len(self.classes) != num_classes:
            raise ValueError(f"{num_classes} classes but names {self.classes}")
        self.geometric, self.warp, self.intensity = em_augmentations(strong_augment, ignore_index)
        # The mean teacher: an EMA copy of the whole network, always in eval mode.
        self.teacher = frozen_copy(self.net).eval() if semi_supervised else None
        self.unlabeled_geometric, self.unlabeled_warp, self.unlabeled_intensity = em_augmentations(strong_augment, ignore_index, ".unlabeled") if semi_supervised else (None, None, None)
        self._teacher_step = 0  # the optimizer step the teacher was last updated after
        self._frozen = False
        self._untrainable: set[str] = set()  # backbone parameters the features never use
        self._ddp_syncs_backbone = True
        self.set_backbone_frozen(unfreeze_at_step is None or unfreeze_at_step > 0)
        # Rows = target, columns = prediction, over pixels whose target is not ignored; summed
        # over ranks by torchmetrics at compute() (each rank scores its own validation tiles).
        self.val_confusion = MulticlassConfusionMatrix(num_classes, ignore_index=ignore_index, validate_args=False)
        self._val_sums: torch.Tensor | None = None  # see validation_step

    # -- freezing -----------------------------------------------------------------------
    @property
    def backbone(self) -> nn.Module:
        return self.net.extractor.backbone

    def set_backbone_frozen(self, frozen: bool) -> None:
        """Frozen: no grads, and eval mode (BatchNorm statistics and dropout stay put).
        Parameters the features never use (a ViT's final norm, blocks past the deepest level)
        stay without grads either way: DDP fails on a trainable parameter that gets none."""
        self._frozen = frozen
        for name, p in self.backbone.named_parameters():
            p.requires_grad_(not frozen and name not in self._untrainable)
        self.backbone.train(self.training and not frozen)

    def train(self, mode: bool = True):
        super().train(mode)
        if self._frozen:
            self.backbone.eval()
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def on_train_batch_start(self, batch, batch_idx) -> None:
        step = self.hparams.unfreeze_at_step
        if self._frozen and step is not None and self.global_step >= step:
            self.set_backbone_frozen(False)

    # -- data -----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None:
            check_fits(self.net.extractor.spec, dm.tile_size, self.backbone_meta.architecture)
            if dm.num_classes != self.hparams.num_classes:
                raise ValueError(f"the data has {dm.num_classes} classes {dm.classes} but the model was built for {self.hparams.num_classes}")
            if stage == "fit" and bool(getattr(dm, "unlabeled_slices", None)) != (self.teacher is not None):
                raise UserError("semi-supervised fine-tuning needs both --semi-supervised and unlabeled slices (--unlabeled-slices, by default all "
                                f"neither trained on nor scored); got semi_supervised {self.teacher is not None} and unlabeled slices {getattr(dm, 'unlabeled_slices', None)}")
            if stage == "fit":
                self._untrainable = unused_parameters(self.net.extractor, dm.tile_size)
                self.set_backbone_frozen(self._frozen)

    def on_fit_start(self) -> None:
        # DDP has wrapped the model by now and averages the gradients of exactly the
        # parameters that needed them at that moment: a backbone frozen then is not among them.
        self._ddp_syncs_backbone = any(p.requires_grad for p in self.backbone.parameters())

    def on_before_optimizer_step(self, optimizer) -> None:
        """After a late unfreeze, average the backbone's gradients over ranks ourselves (one
        all-reduce of them all), since DDP does not; without it the ranks drift apart."""
        if self._frozen or self._ddp_syncs_backbone or not (dist.is_available() and dist.is_initialized()):
            return
        grads = [p.grad for p in self.backbone.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        for g, avg in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(avg.view_as(g))

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Standardise with the backbone's (mean, std); augment training batches on the device."""
        image, target = batch["image"], batch["target"]
        if self.training and self.hparams.augment:
            both = self.geometric(torch.cat([image, target[:, None].to(image.dtype)], 1))
            image, target = both[:, :1], both[:, 1].round().long()
            if self.warp is not None:
                image, target = self.warp(image, target)
            image = (image - self.normalization.mean) / self.normalization.std
            image = self.intensity(image)
        else:
            image = (image - self.normalization.mean) / self.normalization.std
        out = {"image": image, "target": target}
        if "unlabeled" in batch and self.training:
            # The weak view (what the teacher sees); the strong one is made from it in
            # training_step, once the teacher's labels exist to be warped along with it.
            weak = (batch["unlabeled"] - self.normalization.mean) / self.normalization.std
            out["unlabeled"] = self.unlabeled_geometric(weak) if self.hparams.augment else weak
        return out

    def strong_view(self, weak: torch.Tensor, pseudo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """weak: (B, 1, H, W) standardised, pseudo: (B, H, W) -> the student's view and the
        labels that go with it: one warp for both (pixels warped in from outside the tile
        become ignore), then intensity changes of the image alone."""
        if not self.hparams.augment:
            return weak, pseudo
        if self.unlabeled_warp is not None:
            weak, pseudo = self.unlabeled_warp(weak, pseudo)
        return self.unlabeled_intensity(weak), pseudo

    # -- steps ------------------------------------------------------------------------------
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image: (B, 1, H, W) standardised -> logits (B, K, H, W)."""
        if self._frozen:
            with torch.no_grad():
                feats = self.net.extractor(image)
            return self.net.head(feats, image)
        return self.net(image)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ignore = self.hparams.ignore_index
        if (target != ignore).sum() == 0:  # an all-unlabeled batch: no signal, keep the graph
            return logits.sum() * 0.0
        loss = F.cross_entropy(logits, target, ignore_index=ignore)
        if self.hparams.dice_weight:
            loss = loss + self.hparams.dice_weight * soft_dice_loss(logits, target, ignore)
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.teacher is None or "unlabeled" not in batch:
            loss = self.loss(self(batch["image"]), batch["target"])
            self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
            return loss
        image, weak = batch["image"], batch["unlabeled"]  # (B, 1, H, W), (Bu, 1, H, W)
        with torch.no_grad():
            pseudo = pseudo_labels(self.teacher(weak), self.hparams.confidence, self.hparams.ignore_index)  # (Bu, H, W)
        strong, pseudo = self.strong_view(weak, pseudo)
        # One forward over both, as in FixMatch: BatchNorm sees one batch per step.
        logits = self(torch.cat([image, strong]))
        supervised = self.loss(logits[: len(image)], batch["target"])
        consistency = consistency_loss(logits[len(image) :], pseudo, self.hparams.ignore_index)
        loss = supervised + self.consistency_weight_now() * consistency
        n = image.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log_dict({"train/supervised": supervised, "train/consistency": consistency,
                       "train/confident": (pseudo != self.hparams.ignore_index).float().mean()}, batch_size=n)  # fmt: skip
        return loss

    def consistency_weight_now(self) -> float:
        """consistency_weight x the sigmoid ramp-up over the first consistency_rampup of the run."""
        h = self.hparams
        return h.consistency_weight * sigmoid_rampup(self.global_step if self._trainer is not None else 0, round(h.consistency_rampup * self.total_steps()))

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        """The teacher follows the student once per optimizer step (parameters and BatchNorm
        statistics, which it predicts with in eval mode)."""
        if self.teacher is not None and self.global_step != self._teacher_step:
            ema_update_(self.teacher, self.net, self.hparams.teacher_momentum, buffers=True)
            self._teacher_step = self.global_step

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Adds this batch to the validation confusion matrix and loss sums; nothing is logged
        per batch."""
        logits, target = self(batch["image"]), batch["target"]
        ignore = self.hparams.ignore_index
        ce = F.cross_entropy(logits.float(), target, ignore_index=ignore, reduction="sum")
        inter, denom = dice_sums(logits.float(), target, ignore)
        sums = torch.cat([ce.double().view(1), (target != ignore).sum().double().view(1), inter.double(), denom.double()])
        self._val_sums = sums if self._val_sums is None else self._val_sums + sums
        self.val_confusion.update(logits.argmax(1), target)

    def on_validation_epoch_start(self) -> None:
        self._val_sums = None

    def on_validation_epoch_end(self) -> None:
        """val/loss and val/iou over every validation tile of every rank, as one process
        would compute them over all of them at once: the loss sums (cross-entropy, labeled
        pixels, Dice terms) are added up over ranks in one all-reduce and torchmetrics sums the
        confusion matrices, so every rank logs the same values and the weights kept by val/loss
        are the same on all. The loss is `loss` over the whole validation set as one batch
        (not a mean of per-batch losses, which would depend on how tiles fall into batches)."""
        k = self.hparams.num_classes
        sums = self._val_sums if self._val_sums is not None else torch.zeros(2 + 2 * k, dtype=torch.float64, device=self.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)  # every rank has run the same number of batches (GridTiles)
        ce, pixels, inter, denom = sums[0], sums[1], sums[2 : 2 + k], sums[2 + k :]
        loss = torch.zeros((), dtype=torch.float64, device=sums.device)  # no labeled pixel: no signal, as in `loss`
        if pixels > 0:
            loss = ce / pixels + (self.hparams.dice_weight * soft_dice_from_sums(inter, denom) if self.hparams.dice_weight else 0.0)
        iou = torch.from_numpy(iou_dice(self.val_confusion.compute().cpu().numpy())[0]).float()
        self.log("val/loss", loss.float(), prog_bar=False)
        self.log("val/iou", iou.nanmean() if iou.numel() else torch.tensor(0.0), prog_bar=True)
        for name, v in zip(self.classes, iou):
            self.log(f"val/iou_{name}", v)
        self.last_val_iou = {name: float(v) for name, v in zip(self.classes, iou)}
        self.val_confusion.reset()
        self._val_sums = None

    # -- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self):
        """AdamW; backbone groups at lr x backbone_lr_scale x layer-wise decay. All parameters
        are in the optimizer from the start: frozen ones have no grad, so AdamW skips them."""
        from timm.optim import param_groups_layer_decay

        h = self.hparams
        groups = [{"params": [p for p in self.net.head.parameters()], "lr": h.lr}]
        # timm's grouping skips parameters without requires_grad; a backbone frozen now but
        # unfrozen later must still be in the optimizer, so group it as if trainable.
        trainable = [p.requires_grad for p in self.backbone.parameters()]
        self.backbone.requires_grad_(True)
        backbone_groups = param_groups_layer_decay(self.backbone, weight_decay=h.weight_decay, layer_decay=h.layer_decay)
        for p, t in zip(self.backbone.parameters(), trainable):
            p.requires_grad_(t)
        backbone_lr_scale = h.backbone_lr_scale if h.backbone_lr_scale is not None else (1.0 if h.random_init else 0.1)
        for g in backbone_groups:
            scale = g.pop("lr_scale", 1.0)
            g["lr"] = h.lr * backbone_lr_scale * scale
            groups.append(g)
        # Fused (one kernel over all parameters) on CPU and CUDA: on the 2-core EPYC its step over
        # this U-Net's 11.6 M parameters took 9.8 ms of CPU against 35-56 ms for the default
        # per-tensor loop, a third of a batch-4 fine-tuning step (benchmarks/RESULTS.md, issue 21).
        fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
        opt = torch.optim.AdamW(groups, lr=h.lr, weight_decay=h.weight_decay, fused=fused)
        total = self.total_steps()
        warmup = h.warmup_steps if h.warmup_steps is not None else round(0.05 * total)
        if not warmup and not h.cosine:
            return opt
        factor = (lambda s: warmup_cosine(s, warmup, total, COSINE_FLOOR)) if h.cosine else (lambda s: min(1.0, (s + 1) / warmup))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def total_steps(self) -> int:
        """The run's optimizer steps, which the lr schedule spans (0 without a trainer)."""
        if self._trainer is None:
            return 0
        steps = self.trainer.max_steps
        return int(steps if steps is not None and steps >= 0 else self.trainer.estimated_stepping_batches)

    # -- export ---------------------------------------------------------------------------------
    def finetuned_meta(self, tile_size: int, metrics: dict | None = None, label_values: list[int] | None = None) -> FinetunedMeta:
        h = self.hparams
        return FinetunedMeta(
            task=h.task,
            classes=self.classes,
            backbone=self.backbone_meta.to_dict(),
            backbone_source=self.backbone_source,
            feature_indices=self.net.extractor.indices,
            head=head_config(self.net.head),
            tile_size=tile_size,
            normalization=self.normalization.to_dict(),
            ignore_index=h.ignore_index,
            label_values=label_values,
            random_init=h.random_init,
            metrics=metrics or {},
            steps=int(self.global_step),
        )

    def export(self, out: str | Path, tile_size: int, metrics: dict | None = None, label_values: list[int] | None = None) -> Path:
        """Weights-only safetensors + JSON; `ssl_em.finetune.model_folder.load_finetuned` reads it back."""
        return export_finetuned(self.net, out, self.finetuned_meta(tile_size, metrics, label_values))


def module_meta(backbone: nn.Module) -> BackboneMeta:
    """Best-effort metadata for a timm model handed over as a module (tests, notebooks): the
    architecture from its pretrained_cfg, in_chans and a ViT's img_size. Constructor kwargs
    beyond those (depth, embed_dim...) cannot be recovered, so export such a model only if
    it was built from timm defaults; pass a name or an exported folder otherwise."""
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    args: dict = {"in_chans": int(getattr(backbone, "in_chans", 1) or 1)}
    img_size = getattr(getattr(backbone, "patch_embed", None), "img_size", None)
    if img_size is not None:
        args["img_size"] = int(img_size[0])
    return BackboneMeta(architecture=cfg.get("architecture", type(backbone).__name__), model_args=args, in_chans=args["in_chans"], img_size=args.get("img_size"), patch_size=patch_size_of(backbone))


def unused_parameters(extractor: FeatureExtractor, tile_size: int) -> set[str]:
    """Names of backbone parameters that get no gradient from the feature maps, found by one
    forward and backward of a blank (1, C, T, T) tile in eval mode (nothing is updated)."""
    backbone = extractor.backbone
    was_training, flags = backbone.training, {n: p.requires_grad for n, p in backbone.named_parameters()}
    backbone.eval().requires_grad_(True)
    p0 = next(backbone.parameters())
    x = torch.zeros(1, extractor.spec.in_chans, tile_size, tile_size, device=p0.device, dtype=p0.dtype)
    with torch.enable_grad():
        sum(f.float().sum() for f in extractor(x)).backward()
    unused = {n for n, p in backbone.named_parameters() if p.grad is None}
    for n, p in backbone.named_parameters():
        p.grad = None
        p.requires_grad_(flags[n])
    backbone.train(was_training)
    return unused


def check_fits(spec: FeatureSpec, tile_size: int, architecture: str) -> None:
    """The tile must be a multiple of the backbone's coarsest reduction (ViT patch, CNN stride)."""
    m = spec.input_multiple
    if tile_size % m:
        raise BackboneError(f"tile size {tile_size} does not fit {architecture}: it must be a multiple of {m} (its {'patch size' if spec.columnar else 'coarsest feature stride'})")
