"""The label-efficiency benchmark: slice choice, resumable CSV, table and plot."""

from __future__ import annotations

import json

import pytest

from ssl_em.finetune.benchmark import Arm, choose_slices, label_efficiency
from ssl_em.finetune.benchmark_report import gains_table, markdown_table, paired_gains, read_rows, report, summarize


def test_choose_slices_is_seeded_sized_and_inside_the_pool():
    pool = list(range(20))
    a = choose_slices(pool, 4, seed=0)
    assert a == choose_slices(pool, 4, seed=0) and len(set(a)) == 4 and set(a) <= set(pool)
    assert choose_slices(pool, 4, seed=1) != a
    with pytest.raises(ValueError, match="exceeds"):
        choose_slices(pool, 21, 0)


def test_grid_runs_resumes_and_reports(tmp_path, monkeypatch):
    calls = []

    def fake_finetune(backbone, images, labels, train, val, task, random_init, seed, **kw):
        calls.append((backbone, tuple(train), random_init, seed))
        return None, {"mean_iou": 0.5 + 0.1 * len(train) - 0.2 * random_init}

    import ssl_em.finetune.cli as ft_cli

    monkeypatch.setattr(ft_cli, "finetune", fake_finetune)
    arms = [Arm("mae", "ckpt/mae", twin="random"), Arm("random", "ckpt/mae", True, twin="random")]
    rows = label_efficiency(arms, "img", "lbl", list(range(10)), [10, 11], [1, 2], [0, 1], tmp_path, progress=False)
    assert len(rows) == len(calls) == 8
    assert {c[2] for c in calls} == {False, True}
    # A re-run finds every row in the CSV and trains nothing.
    calls.clear()
    assert len(label_efficiency(arms, "img", "lbl", list(range(10)), [10, 11], [1, 2], [0, 1], tmp_path, progress=False)) == 8
    assert calls == []
    summary = summarize(rows)
    assert summary["mae"][2][0] == pytest.approx(0.7) and summary["random"][1][0] == pytest.approx(0.4)
    table = report(tmp_path, "mean_iou")
    assert "| mae |" in table and (tmp_path / "plot.png").stat().st_size > 1000
    assert "0.700 ± 0.000 (n=2)" in markdown_table(summary, "mean_iou")


def test_unknown_metric_is_a_clear_error(tmp_path, monkeypatch):
    import ssl_em.finetune.cli as ft_cli

    monkeypatch.setattr(ft_cli, "finetune", lambda *a, **k: (None, {"mean_iou": 1.0}))
    with pytest.raises(KeyError, match="dice/membrane"):
        label_efficiency([Arm("a", "b")], "i", "l", [0, 1], [2], [1], [0], tmp_path, metric="dice/membrane", progress=False)


def _row(arm, random_init, budget, seed, score, backbone="ckpt/mae"):
    return {"arm": arm, "backbone": backbone, "random_init": str(random_init), "twin": "rand", "budget": str(budget), "seed": str(seed),
            "train_slices": "0", "metric": "m", "score": str(score), "seconds": "1", "metrics_json": "{}"}


def test_paired_gains_pair_each_seed_with_its_random_twin():
    rows = [_row("mae", False, 1, 0, 0.8), _row("rand", True, 1, 0, 0.7),
            _row("mae", False, 1, 1, 0.6), _row("rand", True, 1, 1, 0.65),
            _row("mae", False, 2, 0, 0.9),  # no twin yet: not paired
            _row("moco", False, 1, 0, 0.75, backbone="ckpt/moco")]  # same architecture: same twin
    gains = paired_gains(rows)
    mean, std, wins, pairs = gains["mae"][1]
    assert (mean, wins, pairs) == (pytest.approx(0.025), 1, 2) and std == pytest.approx(0.075)
    assert 2 not in gains["mae"] and "rand" not in gains
    assert gains["moco"][1][0] == pytest.approx(0.05)
    assert "+0.025 ± 0.075 (1/2 wins)" in gains_table(gains, "m")


def test_backbones_of_one_architecture_share_a_random_twin_and_the_unet_is_always_there(tmp_path):
    import timm

    from ssl_em.backbones import BackboneMeta
    from ssl_em.export import export_backbone
    from ssl_em.finetune.benchmark import arms_for

    for name, model in (("mae", "test_vit"), ("moco", "test_vit"), ("cnn", "test_resnet")):
        net = timm.create_model(model, in_chans=1, num_classes=0, pretrained=False)
        export_backbone(net, tmp_path / name, BackboneMeta(model, model_args={"in_chans": 1}, method=name))
    arms = arms_for([str(tmp_path / n) for n in ("mae", "moco", "cnn")], unet_lr=2e-3)
    unet = "U-Net from scratch (resnet18)"
    assert [(a.name, a.random_init) for a in arms] == [("mae", False), ("moco", False), ("cnn", False),
                                                       ("random-init (mae arch)", True), ("random-init (cnn arch)", True), (unet, True)]
    assert [a.twin for a in arms[:3]] == ["random-init (mae arch)", "random-init (mae arch)", "random-init (cnn arch)"]
    assert {a.baseline for a in arms} == {unet} and arms[-1].backbone == "resnet18"
    assert arms[-1].settings == {"lr": 2e-3, "unfreeze_at_step": 0}  # its own lr, end to end

    # A CNN backbone of the U-Net's own architecture: its twin *is* the U-Net, run once.
    arms = arms_for([str(tmp_path / n) for n in ("mae", "cnn")], unet_encoder="test_resnet")
    unet = "U-Net from scratch (test_resnet)"
    assert [a.name for a in arms] == ["mae", "cnn", "random-init (mae arch)", unet]
    assert arms[1].twin == arms[1].baseline == unet and arms[-1].twin == arms[-1].baseline == unet

    # ... also when the export records the arguments every ssl_em backbone is built with
    # (what `ssl-em export` writes: num_classes 0, global_pool avg), as the shipped one does.
    net = timm.create_model("test_resnet", in_chans=1, num_classes=0, pretrained=False)
    export_backbone(net, tmp_path / "full", BackboneMeta("test_resnet", model_args={"in_chans": 1, "num_classes": 0, "global_pool": "avg"}))
    assert [a.name for a in arms_for([str(tmp_path / "full")], unet_encoder="test_resnet")] == ["full", unet]

    # Settings for the pretrained arms (--backbone-lr-scale) leave the baselines' own.
    arms = arms_for([str(tmp_path / n) for n in ("mae", "cnn")], pretrained_settings={"backbone_lr_scale": 1.0})
    assert [a.settings for a in arms] == [{"backbone_lr_scale": 1.0}] * 2 + [{}] * 2 + [{"lr": 1e-3, "unfreeze_at_step": 0}]

    # A backbone's own recommendation (ssl_em.json "finetune") sets its arm; flags beat it.
    export_backbone(net, tmp_path / "spark", BackboneMeta("test_resnet", model_args={"in_chans": 1}, finetune={"unfreeze_at_step": 0, "backbone_lr_scale": 1.0}))
    arms = arms_for([str(tmp_path / "spark"), str(tmp_path / "cnn")])
    assert [a.settings for a in arms[:2]] == [{"unfreeze_at_step": 0, "backbone_lr_scale": 1.0}, {}]
    assert arms_for([str(tmp_path / "spark")], pretrained_settings={"backbone_lr_scale": 0.5})[0].settings == {"unfreeze_at_step": 0, "backbone_lr_scale": 0.5}


def test_unet_arm_runs_every_budget_plus_the_ceiling_and_pairs_by_seed(tmp_path, monkeypatch):
    import ssl_em.finetune.cli as ft_cli
    from ssl_em.finetune.benchmark import arms_for

    calls = []

    def fake_finetune(backbone, images, labels, train, val, task, random_init, seed, **kw):
        calls.append((backbone, len(train), seed, kw.get("lr"), kw.get("unfreeze_at_step")))
        return None, {"mean_iou": 0.1 * len(train) + 0.01 * seed + (0.2 if not random_init else 0.1 if backbone == "resnet18" else 0.0)}

    monkeypatch.setattr(ft_cli, "finetune", fake_finetune)
    arms = arms_for(["ckpt/mae"], unet_lr=5e-3)
    rows = label_efficiency(arms, "i", "l", list(range(6)), [6], [1, 2], [0, 1], tmp_path, finetune_kwargs={"lr": 1e-4, "unfreeze_at_step": 50}, progress=False)
    unet_calls = sorted((n, s) for b, n, s, lr, u in calls if b == "resnet18" and (lr, u) == (5e-3, 0))
    assert unet_calls == [(1, 0), (1, 1), (2, 0), (2, 1), (6, 0), (6, 1)]  # budgets, then the whole pool: the ceiling
    assert len(rows) == 2 * 2 * 3 + 2 and all(lr == 1e-4 for b, n, s, lr, u in calls if b != "resnet18")
    over_unet, over_twin = paired_gains(rows, "baseline"), paired_gains(rows, "twin")
    assert over_unet["ckpt/mae".split("/")[-1]][1][:4] == (pytest.approx(0.1), pytest.approx(0.0), 2, 2)
    assert over_unet["random-init (mae arch)"][2][0] == pytest.approx(-0.1) and 6 not in over_unet["mae"]
    assert over_twin["mae"][2][0] == pytest.approx(0.2) and "U-Net from scratch (resnet18)" not in over_unet
    table = report(tmp_path, "mean_iou")
    assert "| ceiling: U-Net from scratch (resnet18), all 6 labeled slices | 0.705 ± 0.005 (n=2) |" in table
    assert "gain over random init" in table and "gain over U-Net from scratch (resnet18)" in table


def test_gains_over_both_baselines_match_a_hand_computed_example():
    """mae vs its twin and vs the U-Net at budget 1, seeds 0 and 1:
    mae 0.80 / 0.60, twin 0.70 / 0.65, U-Net 0.75 / 0.50 (0.90 / 0.86 with all 4 slices).
    Over the twin: +0.10, -0.05 -> +0.025 ± 0.075, 1/2 wins. Over the U-Net: +0.05, +0.10
    -> +0.075 ± 0.025, 2/2 wins; the twin over the U-Net: -0.05, +0.15 -> +0.050 ± 0.100."""
    from ssl_em.finetune.benchmark_report import _ceiling_label, ceiling

    u = "U-Net from scratch (resnet18)"
    rows = [_row("mae", False, 1, 0, 0.80) | {"baseline": u}, _row("rand", True, 1, 0, 0.70) | {"baseline": u},
            _row(u, True, 1, 0, 0.75) | {"twin": u, "baseline": u},
            _row("mae", False, 1, 1, 0.60) | {"baseline": u}, _row("rand", True, 1, 1, 0.65) | {"baseline": u},
            _row(u, True, 1, 1, 0.50) | {"twin": u, "baseline": u},
            _row(u, True, 4, 0, 0.90) | {"twin": u, "baseline": u}, _row(u, True, 4, 1, 0.86) | {"twin": u, "baseline": u}]
    twin, unet = paired_gains(rows, "twin"), paired_gains(rows, "baseline")
    assert twin["mae"][1] == (pytest.approx(0.025), pytest.approx(0.075), 1, 2) and set(twin) == {"mae"}
    assert unet["mae"][1] == (pytest.approx(0.075), pytest.approx(0.025), 2, 2)
    assert unet["rand"][1] == (pytest.approx(0.05), pytest.approx(0.1), 1, 2) and u not in unet
    assert ceiling(rows)[:2] == (u, 4) and ceiling(rows)[2][:2] == (pytest.approx(0.88), pytest.approx(0.02))
    # Rows that record their pool: the largest budget is "all labels" only if it is the pool.
    assert _ceiling_label(ceiling(rows)) == f"ceiling: {u}, all 4 labeled slices"  # no pool recorded
    assert _ceiling_label(ceiling([r | {"pool": "4"} for r in rows])) == f"ceiling: {u}, all 4 labeled slices"
    assert _ceiling_label(ceiling([r | {"pool": "20"} for r in rows])) == f"top: {u}, 4 of 20 labeled slices"
    assert "+0.075 ± 0.025 (2/2 wins)" in gains_table(unet, "m", u)


def test_results_from_before_the_twin_column_are_upgraded(tmp_path):
    """A results.csv written without the `twin` column: merging new rows rewrites it with the
    current header, and old rows pair with the twin named after their backbone."""
    import csv

    old_fields = ["arm", "backbone", "random_init", "budget", "seed", "train_slices", "metric", "score", "seconds", "metrics_json"]
    (tmp_path / "all").mkdir()
    with open(tmp_path / "all" / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=old_fields, extrasaction="ignore")
        w.writeheader()
        w.writerows([_row("mae", False, 1, 0, 0.8), _row("random-init (mae arch)", True, 1, 0, 0.7)])
    (tmp_path / "new").mkdir()
    with open(tmp_path / "new" / "results.csv", "w", newline="") as f:
        from ssl_em.finetune.benchmark_report import FIELDS

        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerow(_row("moco", False, 1, 0, 0.9, backbone="ckpt/moco") | {"twin": "random-init (mae arch)"})
    table = report(tmp_path / "all", "m", merge=[tmp_path / "new"])
    rows = read_rows(tmp_path / "all" / "results.csv")
    assert len(rows) == 3 and list(rows[0]) == FIELDS
    gains = paired_gains(rows)
    assert gains["mae"][1][0] == pytest.approx(0.1) and gains["moco"][1][0] == pytest.approx(0.2)
    assert "| moco |" in table


def test_report_merges_parallel_folders_once(tmp_path):
    import csv

    from ssl_em.finetune.benchmark_report import FIELDS

    for name, rows in {"a": [_row("mae", False, 1, 0, 0.8), _row("rand", True, 1, 0, 0.7)],
                       "b": [_row("mae", False, 1, 1, 0.6), _row("rand", True, 1, 1, 0.65)]}.items():
        (tmp_path / name).mkdir()
        with open(tmp_path / name / "results.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            w.writeheader()
            w.writerows(rows)
    table = report(tmp_path / "all", "m", merge=[tmp_path / "a", tmp_path / "b"])
    report(tmp_path / "all", "m", merge=[tmp_path / "a", tmp_path / "b"])  # again: nothing doubled
    assert len(read_rows(tmp_path / "all" / "results.csv")) == 4
    assert "0.700 ± 0.100 (n=2)" in table and "(1/2 wins)" in table


def _write_results(folder, rows):
    import csv

    from ssl_em.finetune.benchmark_report import FIELDS

    folder.mkdir()
    with open(folder / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)


def test_report_merge_counts_rows_shared_by_merged_folders_once(tmp_path):
    """Folders started from one copy of the U-Net's rows each carry them: merged, each cell
    counts once (n and the spread are not inflated)."""
    unet = [_row("rand", True, 1, 0, 0.7), _row("rand", True, 1, 1, 0.6)]
    _write_results(tmp_path / "a", unet + [_row("mae", False, 1, 0, 0.8)])
    _write_results(tmp_path / "b", unet + [_row("mae", False, 1, 1, 0.7)])
    table = report(tmp_path / "all", "m", merge=[tmp_path / "a", tmp_path / "b"])
    assert len(read_rows(tmp_path / "all" / "results.csv")) == 4
    assert "| rand | 0.650 ± 0.050 (n=2) |" in table


def test_report_merge_refuses_mixing_semi_supervised_rows(tmp_path):
    from ssl_em.errors import UserError

    semi = '{"semi_supervised": true}'
    _write_results(tmp_path / "plain", [_row("mae", False, 1, 0, 0.8), _row("rand", True, 1, 0, 0.7)])
    _write_results(tmp_path / "semi", [_row("mae", False, 1, 1, 0.7) | {"settings": semi}])
    with pytest.raises(UserError, match="semi-supervised"):
        report(tmp_path / "all", "m", merge=[tmp_path / "plain", tmp_path / "semi"])
    assert not (tmp_path / "all" / "results.csv").exists()  # refused before anything is written


def test_cli_budget_all_is_the_whole_pool(tmp_path, monkeypatch):
    import ssl_em.finetune.cli as ft_cli
    from ssl_em.cli import main

    calls = []

    def fake_finetune(backbone, images, labels, train, val, **kw):
        calls.append((tuple(train), kw["random_init"]))
        return None, {"mean_iou": 0.5}

    monkeypatch.setattr(ft_cli, "finetune", fake_finetune)
    import ssl_em.finetune.benchmark as bench

    monkeypatch.setattr(bench, "check_backbone", lambda b: None)  # "ckpt/mae" is never loaded: finetune is faked
    monkeypatch.setattr(bench, "check_data", lambda *a: None)  # nor are "i" and "l"
    argv = ["benchmark", "label-efficiency", "--backbones", "ckpt/mae", "--images", "i", "--labels", "l", "--pool", "0-3",
            "--val-slices", "4", "--budgets", "1,all", "--seeds", "0", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert sorted(len(train) for train, _ in calls) == [1, 1, 1, 4, 4, 4] and {r for _, r in calls} == {False, True}
    unet = "U-Net from scratch (resnet18)"
    assert [(r["arm"], r["twin"]) for r in read_rows(tmp_path / "results.csv")][:3] == [
        ("mae", "random-init (mae arch)"), ("random-init (mae arch)", "random-init (mae arch)"), (unet, unet)]


def test_cli_backbone_lr_scale_reaches_the_pretrained_arms_only(tmp_path, monkeypatch):
    import ssl_em.finetune.benchmark as bench
    import ssl_em.finetune.cli as ft_cli
    from ssl_em.cli import main

    scales = {}

    def fake_finetune(backbone, images, labels, train, val, **kw):
        scales[(backbone, kw["random_init"])] = kw.get("backbone_lr_scale")
        return None, {"mean_iou": 0.5}

    monkeypatch.setattr(ft_cli, "finetune", fake_finetune)
    monkeypatch.setattr(bench, "check_backbone", lambda b: None)
    monkeypatch.setattr(bench, "check_data", lambda *a: None)
    argv = ["benchmark", "label-efficiency", "--backbones", "ckpt/mae", "--images", "i", "--labels", "l", "--pool", "0-3",
            "--val-slices", "4", "--budgets", "1", "--seeds", "0", "--no-ceiling", "--backbone-lr-scale", "1.0", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert scales == {("ckpt/mae", False): 1.0, ("ckpt/mae", True): None, ("resnet18", True): None}  # baselines: their own default
    recorded = {r["arm"]: json.loads(r["settings"]) for r in read_rows(tmp_path / "results.csv")}
    assert recorded["mae"] == {"lr": 1e-3, "unfreeze_at_step": None, "backbone_lr_scale": 1.0}  # each row says how it was fine-tuned
    assert recorded["U-Net from scratch (resnet18)"] == {"lr": 1e-3, "unfreeze_at_step": 0}


@pytest.mark.parametrize("mistake, message", [
    ({"--pool": "0-9"}, "--train-slices"),  # the stack has 6 slices
    ({"--pool": "0-3", "--val-slices": "3-5"}, "both training and validation"),
    ({"--labels": "missing.tif"}, "missing.tif"),
    ({"--label-values": "0,9"}, "label"),
])
def test_cli_data_mistakes_fail_before_any_run(synthetic_small, tmp_path, monkeypatch, capsys, mistake, message):
    import tifffile

    import ssl_em.finetune.benchmark as bench
    import ssl_em.finetune.cli as ft_cli
    from ssl_em.cli import main

    tifffile.imwrite(tmp_path / "im.tif", synthetic_small.image[:6], photometric="minisblack")
    tifffile.imwrite(tmp_path / "lb.tif", synthetic_small.semantic[:6], photometric="minisblack")
    runs = []
    monkeypatch.setattr(ft_cli, "finetune", lambda *a, **kw: runs.append(a) or (None, {"mean_iou": 0.5}))
    flags = {"--images": str(tmp_path / "im.tif"), "--labels": str(tmp_path / "lb.tif"), "--pool": "0-3", "--val-slices": "4-5", "--label-values": "0,1,2"}
    flags.update({k: str(tmp_path / v) if k == "--labels" else v for k, v in mistake.items()})
    argv = ["benchmark", "label-efficiency", "--backbones", "test_resnet", "--budgets", "1", "--seeds", "0", "--out", str(tmp_path / "out"),
            *[x for kv in flags.items() for x in kv]]
    assert main(argv) == 2 and runs == []
    assert message in capsys.readouterr().err


def _labels_saved_rows(pool="20"):
    """U-Net means 0.70 / 0.76 / 0.80 at 1 / 2 / 4 slices, 0.90 with all 20 (two seeds each);
    spark 0.78 / 0.82 / 0.95; its twin 0.65 / 0.73 at 1 / 2."""
    u = "U-Net from scratch (resnet18)"
    unet = {1: (0.69, 0.71), 2: (0.75, 0.77), 4: (0.80, 0.80), 20: (0.89, 0.91)}
    arms = {"spark": {1: 0.78, 2: 0.82, 4: 0.95}, "rand": {1: 0.65, 2: 0.73}}
    rows = [_row(u, True, b, s, v) | {"twin": u, "baseline": u, "pool": pool} for b, vs in unet.items() for s, v in enumerate(vs)]
    rows += [_row(a, a == "rand", b, s, v) | {"baseline": u, "pool": pool} for a, d in arms.items() for b, v in d.items() for s in (0, 1)]
    return u, rows


def test_labels_saved_match_a_hand_computed_table(tmp_path):
    """spark at 1: gap (0.78 - 0.70) / (0.90 - 0.70) = 40%; the U-Net reaches 0.78 halfway
    from 2 (0.76) to 4 (0.80) slices: 3 slices, 3.0x. At 2: 0.06 / 0.14 = 43%; 0.82 is a
    fifth of the way from 4 (0.80) to 20 (0.90): 7.2 slices, 3.6x. At 4: 0.15 / 0.10 = 150%,
    beyond the U-Net's best: >= 20 / 4 = 5.0x. The twin at 1: -25%, below the U-Net's
    smallest budget: <= 1.0x; at 2: -21%, 1.5 slices: 0.75x."""
    import csv

    from ssl_em.finetune.benchmark_report import LabelsSaved, ceiling, labels_saved, labels_saved_table, summarize

    u, rows = _labels_saved_rows()
    saved = labels_saved(summarize(rows), ceiling(rows))
    assert set(saved) == {"spark", "rand"}  # the U-Net is not compared with itself
    expect = {("spark", 1): (0.4, 3.0, ""), ("spark", 2): (0.06 / 0.14, 3.6, ""), ("spark", 4): (1.5, 5.0, ">="),
              ("rand", 1): (-0.25, 1.0, "<="), ("rand", 2): (-0.03 / 0.14, 0.75, "")}
    for (arm, b), (gap, multiple, bound) in expect.items():
        got = saved[arm][b]
        assert (got.gap_closed, got.multiple, got.bound) == (pytest.approx(gap), pytest.approx(multiple), bound), (arm, b)
    assert saved["spark"][1].text() == "40% of the gap, 3.0x" and saved["spark"][4].text() == "150% of the gap, >= 5.0x"
    assert saved["rand"][1].text() == "-25% of the gap, <= 1.0x"
    table = labels_saved_table(saved, "m", u)
    assert "| spark | 40% of the gap, 3.0x | 43% of the gap, 3.6x | 150% of the gap, >= 5.0x |" in table
    assert "| rand | -25% of the gap, <= 1.0x | -21% of the gap, 0.8x | - |" in table

    # Without the all-labels row (--no-ceiling: the largest budget is not the pool) the gap
    # is not defined; the multiple still is, on the budgets run.
    _, partial = _labels_saved_rows(pool="40")
    s2 = labels_saved(summarize(partial), ceiling(partial))["spark"]
    assert s2[1] == LabelsSaved(None, pytest.approx(3.0), "") and s2[1].text() == "3.0x"

    # report: the table, summary.csv and the plot carry them.
    with open(tmp_path / "results.csv", "w", newline="") as f:
        from ssl_em.finetune.benchmark_report import FIELDS

        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    text = report(tmp_path, "m")
    assert "labels saved vs U-Net from scratch (resnet18)" in text and "3.6x" in text
    with open(tmp_path / "summary.csv", newline="") as f:
        summary = {(r["arm"], int(r["budget"])): r for r in csv.DictReader(f)}
    r = summary[("spark", 2)]
    assert float(r["mean"]) == pytest.approx(0.82) and float(r["unet_mean"]) == pytest.approx(0.76) and float(r["all_labels_mean"]) == pytest.approx(0.90)
    assert float(r["gap_closed"]) == pytest.approx(0.06 / 0.14, abs=1e-6) and float(r["label_multiple"]) == pytest.approx(3.6) and r["label_multiple_bound"] == ""
    assert summary[("spark", 4)]["label_multiple_bound"] == ">=" and float(summary[("spark", 4)]["label_multiple"]) == pytest.approx(5.0)
    assert summary[(u, 20)]["gap_closed"] == "" and summary[(u, 20)]["n"] == "2"
    assert (tmp_path / "plot.png").stat().st_size > 1000


def test_labels_saved_when_lower_is_better():
    """VOI: U-Net 1.0 / 0.8 at 1 / 2 slices, 0.5 with all 4; an arm at 0.7 with 1 slice
    closes (0.7 - 1.0) / (0.5 - 1.0) = 60% of the gap; the U-Net reaches 0.7 a third of the
    way from 2 to 4 slices: 2.67 slices, 2.67x."""
    from ssl_em.finetune.benchmark_report import ceiling, labels_saved, slices_needed, summarize

    u = "U-Net from scratch (resnet18)"
    rows = [_row(u, True, b, 0, v) | {"twin": u, "baseline": u, "pool": "4"} for b, v in ((1, 1.0), (2, 0.8), (4, 0.5))]
    rows.append(_row("arm", False, 1, 0, 0.7) | {"baseline": u, "pool": "4"})
    got = labels_saved(summarize(rows), ceiling(rows), lower_better=True)["arm"][1]
    assert got.gap_closed == pytest.approx(0.6) and got.multiple == pytest.approx(8 / 3) and got.bound == ""
    # A non-monotone curve: the first budget where the U-Net reaches the score counts.
    assert slices_needed({1: 0.7, 2: 0.8, 4: 0.75}, 0.78) == (pytest.approx(1.8), "")
    assert slices_needed({1: 0.7, 2: 0.8, 4: 0.75}, 0.81) == (4.0, ">=")


def test_resume_refuses_rows_run_with_other_settings(tmp_path, monkeypatch):
    """A rerun into the same --out with another --lr used to skip every cell already there
    (keyed by arm, budget and seed alone) and mix the old rows with the new ones."""
    import ssl_em.finetune.benchmark as bench
    import ssl_em.finetune.cli as ft_cli
    from ssl_em.cli import main

    calls = []
    monkeypatch.setattr(ft_cli, "finetune", lambda *a, **kw: calls.append(kw.get("lr")) or (None, {"mean_iou": 0.5}))
    monkeypatch.setattr(bench, "check_backbone", lambda b: None)
    monkeypatch.setattr(bench, "check_data", lambda *a: None)
    argv = ["benchmark", "label-efficiency", "--backbones", "ckpt/mae", "--images", "i", "--labels", "l", "--pool", "0-3",
            "--val-slices", "4", "--budgets", "1", "--seeds", "0", "--no-ceiling", "--out", str(tmp_path)]
    assert main(argv) == 0 and len(calls) == 3
    assert main(argv) == 0 and len(calls) == 3  # same settings: resumed, nothing left to run
    before = (tmp_path / "results.csv").read_text()
    assert main([*argv, "--lr", "0.002"]) == 2
    assert len(calls) == 3 and (tmp_path / "results.csv").read_text() == before
