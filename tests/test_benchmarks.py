"""The step benchmark's bookkeeping on the tiny configuration (one step, in this process)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
bench_step = pytest.importorskip("bench_step")
run_all = pytest.importorskip("run_all")


@pytest.fixture(scope="module")
def cell():
    threads = torch.get_num_threads()
    try:
        return bench_step.child_cell("tiny", 2, steps=1, profile_steps=1, threads=threads)
    finally:
        torch.set_num_threads(threads)


def test_phase_labels_cover_the_step(cell):
    shares = cell["share"]
    labelled = sum(shares[k] for k in bench_step.PHASES)
    assert labelled == pytest.approx(1.0 - shares["other"], abs=1e-9)
    assert 0.0 <= shares["other"] < 0.5  # the labels account for most of the step
    for name in ("student_encoders", "teacher_encoders", "itm_fusion", "mlm", "backward",
                 "optimizer", "ema", "teacher_mlm"):
        assert shares[name] > 0, name  # a renamed label in the task code would read 0
    assert shares["teacher_mlm"] < shares["mlm"]  # nested inside it


def test_held_tensors_match_adamw_bookkeeping(cell):
    held = cell["held_tensors_mib"]
    assert held["gradients"] == pytest.approx(held["student_weights"])
    assert held["adamw_state"] == pytest.approx(2 * held["student_weights"], rel=1e-4)
    assert held["teacher_weights"] < held["student_weights"]  # no ITM head, no temperature
    assert cell["trainable_params"] == 1_119_005
    assert cell["trainable_params"] - cell["teacher_params"] == 32 * 2 + 2 + 1


def test_merge_and_ratios():
    runs = [{"config": "c", "batch_size": b, "step_runs_s": [t], "step_cpu_runs_s": [t / 2],
             "gflop_per_step": 1.0, "peak_rss_mib": 1.0, "load_average_1min": [0.0, 0.0],
             "share": {"teacher_encoders": 0.1, "teacher_mlm": 0.05}}
            for b, t in ((2, 1.0), (8, 2.0))]
    rows = [bench_step._merge([r]) for r in runs]
    assert rows[1]["pairs_per_s"] == 4.0
    assert rows[0]["teacher_forward_share"] == pytest.approx(0.15)
    ratios = bench_step.ratios(rows)
    assert ratios["c pairs/s, batch 8 / batch 2 (wall)"] == pytest.approx(2.0)
    assert ratios["c pairs/s, batch 8 / batch 2 (CPU)"] == pytest.approx(2.0)


def test_retrieval_headlines_growth():
    rows = [{"images": n, "mode": m, "rank_cpu_seconds": s, "fusion_pairs": p}
            for n, m, s, p in ((30, "two_stage", 2.0, 100), (30, "exhaustive", 4.0, 150),
                               (120, "two_stage", 6.0, 400), (120, "exhaustive", 40.0, 2400))]
    h = run_all.retrieval_headlines(rows)
    assert h["retrieval 120 images: exhaustive / two-stage ranking time"] == pytest.approx(40 / 6)
    assert h["retrieval exhaustive: ranking time at 120 / 30 images"] == pytest.approx(10.0)
    assert h["retrieval two_stage: ranking time at 120 / 30 images"] == pytest.approx(3.0)
