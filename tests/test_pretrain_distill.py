"""DINO and BYOL: multi-crop views, learning, teachers moved by EMA only, DINO's centre, resume,
export of the deployable network (DINO's teacher) to plain timm, and the CLI end to end."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from pretrain_utils import TINY_VIT, make_archive

from ssl_em.data.augment import em_view
from ssl_em.export import read_checkpoint
from ssl_em.pretrain.byol import BYOL
from ssl_em.pretrain.dino import DINO, linear_warmup
from ssl_em.pretrain.views import MultiCrop, by_size, em_multicrop
from ssl_em.seeding import generators_in

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "pretrain"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def tiny_dino(**kw) -> DINO:
    torch.manual_seed(0)
    args = dict(backbone="vit_tiny_patch16_224", img_size=32, backbone_kwargs={**TINY_VIT, "dynamic_img_size": True}, local_size=16,
                local_crops=2, hidden_dim=32, bottleneck_dim=16, out_dim=64, freeze_last_layer_steps=0, teacher_temp_warmup_steps=0)
    return DINO(**{**args, **kw})


def tiny_byol(**kw) -> BYOL:
    torch.manual_seed(0)
    return BYOL(backbone="vit_tiny_patch16_224", img_size=32, backbone_kwargs=TINY_VIT, hidden_dim=32, out_dim=16, **kw)


def fixed_views(seed: int = 0, local: bool = True) -> list[torch.Tensor]:
    """Two noisy 32 px views of 8 random tiles, and two 16 px crops of them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 1, 32, 32, generator=g)
    views = [x + 0.3 * torch.randn(x.shape, generator=g) for _ in range(2)]
    return views + ([x[..., :16, :16].clone(), x[..., 16:, 16:].clone()] if local else [])


def train_steps(model, views, steps: int, lr: float = 1e-3) -> list[float]:
    """AdamW over the trainable parameters (teachers have none), the teacher moved by EMA
    before every step as the training step does."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        model.update_momentum(0.9)
        loss = model(*views)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# -- views --------------------------------------------------------------------------------


def test_multicrop_gives_global_then_local_views_of_their_sizes():
    crops = em_multicrop(32, 16, 3)
    views = crops(torch.randn(4, 1, 48, 48))
    assert [tuple(v.shape) for v in views] == [(4, 1, 32, 32)] * 2 + [(4, 1, 16, 16)] * 3
    assert by_size(views) == [(0, 2), (2, 5)]
    assert by_size([views[0], views[2], views[1]]) == [(0, 1), (1, 2), (2, 3)]


def test_local_views_draw_from_their_own_streams():
    """Views built separately with one stream draw the same numbers at a step (the pitfall);
    multi-crop's global and local views, of equal settings here, do not."""
    x = torch.randn(4, 1, 32, 32)

    def first_and_last(crops: MultiCrop) -> tuple[torch.Tensor, torch.Tensor]:
        for g in generators_in(crops):
            g.at_step(0)
        views = crops(x)
        return views[0], views[-1]

    a, b = first_and_last(MultiCrop(em_view(24), 1, em_view(24), 1))
    assert torch.equal(a, b)
    a, b = first_and_last(em_multicrop(24, 24, 1, global_scale=(0.25, 1.0), local_scale=(0.25, 1.0)))
    assert not torch.allclose(a, b)


def test_vit_refuses_local_crops_of_another_size_without_dynamic_img_size():
    from ssl_em.errors import UserError

    with pytest.raises(UserError, match="dynamic_img_size"):
        tiny_dino(backbone_kwargs=TINY_VIT)


# -- learning -----------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", ["vit_tiny_patch16_224", "resnet18"])
def test_dino_forward_on_vit_and_cnn(backbone):
    kw = {} if backbone.startswith("vit") else {"backbone": backbone, "backbone_kwargs": None, "head_batch_norm": True}
    m = tiny_dino(**kw)
    out = m(*fixed_views())
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    assert out["features"].shape == (16, m.backbone.num_features) and out["projection"].shape == (16, 64)
    assert 0 < out["teacher_std"] < 1


def test_dino_loss_falls():
    losses = train_steps(tiny_dino(), fixed_views(), 12)
    assert all(np.isfinite(losses))
    assert sum(losses[-3:]) < 0.9 * sum(losses[:3]), losses


def test_byol_loss_falls():
    losses = train_steps(tiny_byol(), fixed_views(local=False), 12)
    assert all(np.isfinite(losses))
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses


@pytest.mark.parametrize("make", [tiny_dino, tiny_byol], ids=["dino", "byol"])
def test_teacher_moves_by_ema_only(make):
    """No gradient reaches the teacher, the optimizer does not hold it, and an update is
    exactly teacher <- m * teacher + (1 - m) * student."""
    m = make()
    views = fixed_views(local=isinstance(m, DINO))
    teachers, students = m.ema_modules()
    m(*views)["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for t in teachers for p in t.parameters())
    held = {id(p) for g in m.configure_optimizers().param_groups for p in g["params"]}
    assert not held & {id(p) for t in teachers for p in t.parameters()}
    with torch.no_grad():
        for s in students:
            for p in s.parameters():
                p.add_(0.5)
    before = [p.clone() for t in teachers for p in t.parameters()]
    m.update_momentum(0.9)
    after = [p for t in teachers for p in t.parameters()]
    online = [p for s in students for p in s.parameters()]
    assert all(torch.allclose(a, 0.9 * b + 0.1 * o) for a, b, o in zip(after, before, online))


def test_dino_centre_follows_the_teacher_outputs():
    m = tiny_dino(center_momentum=0.9)
    assert torch.count_nonzero(m.criterion.center) == 0
    views = fixed_views()
    m(*views)
    with torch.no_grad():
        expected = 0.1 * m.teacher_head(m.teacher_backbone(torch.cat(views[:2]))).mean(0)
    assert torch.allclose(m.criterion.center.flatten(), expected, atol=1e-6)


def test_teacher_temperature_warms_up_linearly():
    m = tiny_dino(warmup_teacher_temp=0.04, teacher_temp=0.07, teacher_temp_warmup_steps=10)
    assert [round(m.teacher_temp_at(s), 4) for s in (0, 5, 10, 50)] == [0.04, 0.055, 0.07, 0.07]
    assert linear_warmup(3, 0, 1.0, 2.0) == 2.0


def test_dino_clips_gradients_and_freezes_the_last_layer_early():
    """Gradient norm clipped to clip_grad before the optimizer step; the last layer gets no
    gradient during the first freeze_last_layer_steps; fp16 with its scaler is refused."""
    from types import SimpleNamespace

    from ssl_em.errors import UserError

    m = tiny_dino(clip_grad=0.5, freeze_last_layer_steps=3)
    m._trainer = SimpleNamespace(precision="bf16-mixed", global_step=2)
    (m(*fixed_views())["loss"] * 1000).backward()
    m.on_after_backward()
    assert all(p.grad is None for p in m.head.last_layer.parameters())
    m.on_before_optimizer_step(None)
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    assert torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) == pytest.approx(0.5, rel=1e-4)
    m._trainer = SimpleNamespace(precision="16-mixed", global_step=3)
    with pytest.raises(UserError, match="bf16-mixed"):
        m.on_before_optimizer_step(None)


def test_deployable_prefix_of_a_checkpoint():
    from ssl_em.backbones import BackboneError
    from ssl_em.export import deployable_prefix

    assert deployable_prefix({}, "old.ckpt") == "backbone."  # checkpoints from before the hook
    assert deployable_prefix({"deployable": "teacher_backbone"}, "x") == "teacher_backbone."
    with pytest.raises(BackboneError, match="not a module name"):
        deployable_prefix({"deployable": "a.b"}, "x")


def test_deployable_network():
    assert tiny_dino().deployable() == "teacher_backbone" and tiny_dino(export_teacher=False).deployable() == "backbone"
    assert tiny_byol().deployable() == "backbone" and tiny_byol(export_target=True).deployable() == "target_backbone"


# -- command line: train, resume, export -----------------------------------------------------


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    return make_archive(tmp_path_factory.mktemp("data") / "em.zarr")


def _train(archive: Path, recipe: str, run: Path, steps: int, *extra: str) -> None:
    from ssl_em.pretrain.cli import run_argv

    assert run_argv(["--config", str(RECIPES / f"{recipe}.yaml"), "--data", str(archive), "--run_dir", str(run), "--data.batch_size", "8",
                     "--data.samples_per_epoch", "48", "--trainer.max_steps", str(steps), "--checkpoint_every_n_steps", "2",
                     "--trainer.log_every_n_steps", "1", *QUIET, *extra]) == 0  # fmt: skip


def test_dino_resume_restores_teacher_and_centre(archive, tmp_path):
    """Stopped at step 2 and resumed to 4: teacher, centre and student equal an uninterrupted
    4-step run's (the teacher and the centre are in the checkpoint, not rebuilt)."""
    fp32 = ("--trainer.precision", "32-true")
    _train(archive, "tiny_cpu_dino", tmp_path / "whole", 4, *fp32)
    _train(archive, "tiny_cpu_dino", tmp_path / "split", 2, *fp32)
    half = read_checkpoint(tmp_path / "split" / "checkpoints" / "last.ckpt")["state_dict"]
    assert torch.count_nonzero(half["criterion.center"]) > 0
    _train(archive, "tiny_cpu_dino", tmp_path / "split", 4, "--resume", "true", *fp32)
    whole = read_checkpoint(tmp_path / "whole" / "checkpoints" / "last.ckpt")["state_dict"]
    split = read_checkpoint(tmp_path / "split" / "checkpoints" / "last.ckpt")["state_dict"]
    assert not torch.equal(half["criterion.center"], split["criterion.center"])  # it moved on after the resume
    keys = ["criterion.center", *[k for k in whole if k.startswith(("teacher_backbone.", "teacher_head.", "backbone."))]]
    worst = max(((whole[k] - split[k]).abs().max().item(), k) for k in keys if whole[k].is_floating_point())
    print("largest difference resumed vs uninterrupted:", worst)
    # Float32 summation order differs a little between the runs; a centre or teacher rebuilt
    # at the resume would differ by the size of the values themselves (about 1e-2).
    assert worst[0] < 1e-4, worst


def _timm_features(folder: Path, x: torch.Tensor, tmp_path: Path) -> np.ndarray:
    """Features of the exported folder through plain timm, in a process where ssl_em cannot be imported."""
    np.save(tmp_path / "x.npy", x.numpy())
    script = textwrap.dedent(f"""
        import sys
        sys.modules["ssl_em"] = None
        import numpy as np, timm, torch
        torch.set_num_threads(1)
        model = timm.create_model("local-dir:{folder}", pretrained=True).eval()
        with torch.no_grad():
            np.save("{tmp_path / 'y.npy'}", model(torch.from_numpy(np.load("{tmp_path / 'x.npy'}"))).numpy())
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-1500:]
    return np.load(tmp_path / "y.npy")


@pytest.mark.parametrize("recipe,deployed", [("tiny_cpu_dino", "teacher_backbone"), ("tiny_cpu_byol", "backbone")])
def test_cli_trains_and_exports_the_deployable_network(archive, tmp_path, recipe, deployed):
    """`ssl-em pretrain` then `ssl-em export`: the folder holds the method's deployable
    network (DINO's teacher, BYOL's online backbone), plain timm loads it and gives that
    network's features, and `--init_from` starts student and teacher from it."""
    from ssl_em.cli import main
    from ssl_em.backbones import load_backbone
    from ssl_em.pretrain.cli import init_from_export, make_cli

    run = tmp_path / "run"
    _train(archive, recipe, run, 3)
    ckpt = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert ckpt["ssl_em"]["deployable"] == deployed
    assert main(["export", str(run), "--out", str(tmp_path / "bb")]) == 0
    model, meta = load_backbone(tmp_path / "bb")
    assert meta.method.endswith((".DINO", ".BYOL"))
    state = ckpt["state_dict"]
    ours = {k[len(deployed) + 1:]: v for k, v in state.items() if k.startswith(deployed + ".")}
    assert all(torch.equal(v, ours[k]) for k, v in model.state_dict().items())
    other = "backbone" if deployed != "backbone" else "target_backbone"
    assert any(not torch.equal(state[f"{other}.{k}"], v) for k, v in ours.items() if v.is_floating_point())  # a different network
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert np.array_equal(_timm_features(tmp_path / "bb", x, tmp_path), model.eval()(x).numpy())

    cli = make_cli(["--config", str(RECIPES / f"{recipe}.yaml"), "--data", str(archive), "--run_dir", str(tmp_path / "more")])
    assert init_from_export(cli.model, tmp_path / "bb") is True
    now = cli.model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in state.items())  # every network and the centre, as trained
