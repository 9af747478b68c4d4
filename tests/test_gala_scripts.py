"""The gala benchmark scripts (benchmarks/gala_instances.py, benchmarks/gala_report.py):
which slices a label budget trains on, and the table the runs' JSON lines make."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_budget_trains_on_the_benchmarks_seeded_slices_for_its_scheduled_steps():
    from ssl_em.errors import UserError
    from ssl_em.finetune.benchmark import choose_slices

    gala = _script("gala_instances")
    assert gala.labeled_slices(40, 3, (100, 200)) == (list(range(40)), 400)  # all labels: session 6's protocol
    one, steps = gala.labeled_slices(1, 3, (100, 200))
    assert one == choose_slices(list(range(40)), 1, 3) and steps == 308  # 300 + 400 x 0.02 megapixels
    two, steps = gala.labeled_slices(2, 3, (100, 200))
    assert len(two) == 2 and set(two) <= set(range(40)) and steps == 316
    with pytest.raises(UserError):
        gala.labeled_slices(41, 0, (100, 200))


def _run(arm: str, seed: int, voi: float, budget: int | None = None) -> dict:
    row = {"backbone": "/x/checkpoints/em_v3", "arm": arm, "seed": seed, "test": {"voi": voi}}
    return row if budget is None else row | {"budget": budget}


def test_report_pairs_runs_and_reads_labels_saved_against_the_all_labels_unet(tmp_path, monkeypatch, capsys):
    report = _script("gala_report")
    old = tmp_path / "all.jsonl"  # written before the budget key: every slice labeled
    old.write_text("\n".join(json.dumps(r) for r in [_run("random", 0, 0.8), _run("pretrained", 0, 1.2)]) + "\n")
    new = tmp_path / "budgets.jsonl"
    new.write_text("\n".join(json.dumps(r) for r in [_run("random", 0, 2.0, 1), _run("pretrained", 0, 1.0, 1),
                                                         _run("random", 1, 2.0, 1), _run("pretrained", 1, 1.0, 1)]) + "\n")
    rows = report.rows_of([old, new], "voi")
    assert {(r["arm"], r["budget"]) for r in rows} == {(report.UNET, 40), ("em_v3", 40), (report.UNET, 1), ("em_v3", 1)}
    assert report.paired(rows) == {("em_v3", 1): [-1.0, -1.0], ("em_v3", 40): [pytest.approx(0.4)]}

    monkeypatch.setattr(sys, "argv", ["gala_report.py", str(old), str(new)])
    report.main()
    out = capsys.readouterr().out
    assert "em_v3 - U-Net at 1 slice(s): -1.000 mean over 2 seeds, 2/2 pairs won" in out
    # gap: (1.0 - 2.0) / (0.8 - 2.0); the U-Net reaches VOI 1.0 at 1 + 39 x 1.0 / 1.2 slices
    assert "83% of the gap, 33.5x" in out
