"""The fidelity study (benchmarks/fidelity): its metrics against plain references, and ``--quick`` end to end."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

FIDELITY = Path(__file__).resolve().parents[1] / "benchmarks" / "fidelity"
sys.path.insert(0, str(FIDELITY))

import report  # noqa: E402
import study  # noqa: E402

NUMBER = r"-?\d+(?:\.\d+)?"
LAST_LINE = re.compile(
    rf"gap_closed: dense=100% topk64_bucket=({NUMBER})% topk64_renormalize=({NUMBER})% sampled50=({NUMBER})% "
    rf"bytes_per_token_topk64=({NUMBER}) bytes_per_token_sampled50=({NUMBER})"
)


def test_ece_matches_a_loop_over_bins():
    rng = np.random.default_rng(7)
    confidence = np.concatenate([rng.uniform(0, 1, 997), [0.0, 1.0, 1 / 15, 2 / 15]])
    correct = rng.uniform(0, 1, confidence.size) < confidence**0.7
    total = 0.0
    for b in range(15):
        lo, hi = b / 15, (b + 1) / 15
        inside = (confidence > lo) & (confidence <= hi) if b else (confidence <= hi)
        if inside.any():
            total += inside.sum() / confidence.size * abs(correct[inside].mean() - confidence[inside].mean())
    assert study.ece(confidence, correct) == pytest.approx(total, rel=1e-12, abs=1e-15)


def test_dense_kl_matches_float64_sum():
    torch.manual_seed(3)
    student, teacher = torch.randn(3, 5, 37) * 3, torch.randn(3, 5, 37) * 3
    p = torch.softmax(teacher.double(), -1)
    expected = (p * (p.log() - torch.log_softmax(student.double(), -1))).sum(-1).mean()
    assert float(study.dense_kl(student, teacher)) == pytest.approx(float(expected), rel=1e-5)


def test_angle_and_gap_closed():
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([1.0, 1.0, 0.0])
    assert study.angle_degrees(a, b) == pytest.approx(45.0)
    assert study.angle_degrees(a, -a) == pytest.approx(180.0)
    assert report.gap_closed(6.5, 6.3, 6.35) == pytest.approx(75.0)
    assert report.gap_closed(6.5, 6.3, 6.6) == pytest.approx(-50.0)


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    setup = study.Setup(steps=50, batch=1, seq_len=8, lr=1.0, eval_seqs=1)
    lrs = [study.lr_at(s, setup) for s in range(50)]
    assert lrs[4] == pytest.approx(1.0) and lrs[0] == pytest.approx(0.2)
    assert all(x >= y for x, y in zip(lrs[4:], lrs[5:], strict=False)) and lrs[-1] > 0.1


def test_quick_run_end_to_end(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    cmd = [sys.executable, str(FIDELITY / "run.py"), "--quick", "--out", str(out), "--workdir", str(tmp_path / "work")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    text = (out / "RESULTS.md").read_text()
    match = LAST_LINE.fullmatch(text.rstrip("\n").splitlines()[-1])
    assert match, text.splitlines()[-1]
    assert all(math.isfinite(float(x)) for x in match.groups())
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ") and "±" in line}
    assert set(rows) == {"ce", "dense", "topk64_bucket", "topk64_renormalize", "sampled50"}
    for name, line in rows.items():
        numbers = [float(x) for x in re.findall(NUMBER, line.split("|", 2)[2])]
        assert len(numbers) >= 12 and all(math.isfinite(x) for x in numbers), (name, line)
    assert rows["dense"].split("|")[8].strip().startswith("100.0")
    assert rows["ce"].split("|")[8].strip().startswith("0.0")
    assert (out / "fidelity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    results = json.loads((out / "results.json").read_text())
    (seed,) = results["per_seed"]
    assert seed["dense"]["angle_init"] < 1e-3  # the dense gradient against itself
    assert seed["sampled50"]["angle_init_bucket_vs_renormalize"] < 1.0  # one loss for sampled targets
    for run in seed.values():
        assert 0 <= run["ece"] <= 1 and run["kl"] >= 0 and run["ce"] > 0
    caches = results["caches"]
    assert caches["sampled50"]["bytes_per_token"] > 0 and caches["sampled50"]["teacher_mass"] is None
    assert 0 < caches["topk64"]["teacher_mass"] <= 1 + 1e-6 and caches["topk64"]["ids_per_position"] == 64
