"""The fidelity studies (benchmarks/fidelity): their metrics against plain references, ``run.py --quick`` end to end
as a user runs it, and the real-teacher study's code paths with the demo teacher standing in for SmolLM2 (whose
93 MB wheel CI does not have). pyproject.toml's pytest ``pythonpath`` puts the study's scripts on the import path."""

import functools
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import real
import report
import run as fidelity_run
import study
import torch

from softcache import demo

FIDELITY = Path(__file__).resolve().parents[1] / "benchmarks" / "fidelity"
NUMBER = r"-?\d+(?:\.\d+)?"
LAST_LINE = re.compile(
    rf"gap_closed: dense=100% topk64_bucket=({NUMBER})% topk64_renormalize=({NUMBER})% sampled50=({NUMBER})% "
    rf"bytes_per_token_topk64=({NUMBER}) bytes_per_token_sampled50=({NUMBER})"
)
LAST_LINE_REAL = re.compile(
    rf"gap_closed_real: dense=100% topk64_bucket=({NUMBER})% topk64_renormalize=({NUMBER})% sampled12=({NUMBER})% "
    rf"sampled50=({NUMBER})% bytes_per_token_topk64=({NUMBER}) bytes_per_token_sampled12=({NUMBER})"
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


def test_sharpened_teacher_logits_are_the_teachers_over_tau(tmp_path):
    assert study.sharpened_teacher(str(tmp_path), 1.0) == str(study.demo.teacher_path())
    tau = 0.55
    teacher, sharp = study.load_teacher(), study.load_teacher(study.sharpened_teacher(str(tmp_path), tau))
    ids = torch.from_numpy(np.random.default_rng(5).integers(0, teacher.config.vocab_size, (2, 19)))
    with torch.no_grad():
        expected = teacher(input_ids=ids).logits.double() / tau
        got = sharp(input_ids=ids).logits.double()
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_mixed_kd_losses_match_float64_references(tail):
    """(1 − alpha)·CE + alpha·KD over the positions that have a next token, for dense KD and for a cache."""
    vocab, length, k, alpha = 53, 11, 7, 0.3
    student, teacher = study.make_student(vocab, length, 0), study.make_student(vocab, length, 1)
    ids = torch.from_numpy(np.random.default_rng(2).integers(0, vocab, (3, length)))
    teacher.lm_head.weight.data *= 4  # a peaked teacher, so that the tail terms matter
    with torch.no_grad():
        log_q = torch.log_softmax(student(input_ids=ids).logits.double(), -1)[:, :-1]
        log_p = torch.log_softmax(teacher(input_ids=ids).logits.double(), -1)
    ce = -log_q.gather(-1, ids[:, 1:, None]).mean()

    dense_kd = (log_p[:, :-1].exp() * (log_p[:, :-1] - log_q)).sum(-1).mean()
    got = study.run_loss(study.Run("dense", "dense"), student, ids, teacher, alpha=alpha)
    assert float(got.detach()) == pytest.approx(float((1 - alpha) * ce + alpha * dense_kd), rel=1e-5)

    top_lp, top_ids = log_p.topk(k, -1)
    p_s, q_s = top_lp[:, :-1].exp(), log_q.gather(-1, top_ids[:, :-1]).exp()
    if tail == "bucket":
        p_tail, q_tail = 1 - p_s.sum(-1), 1 - q_s.sum(-1)
        kd = (p_s * (p_s.log() - q_s.log())).sum(-1) + p_tail * (p_tail.log() - q_tail.log())
    else:
        p_n = p_s / p_s.sum(-1, keepdim=True)  # against the student's full-vocabulary q (DESIGN.md)
        kd = (p_n * (p_n.log() - q_s.log())).sum(-1)
    targets = (top_ids.int(), top_lp.float())
    got = study.run_loss(study.Run("c", "cache", "c", tail), student, ids, None, targets, alpha)
    assert float(got.detach()) == pytest.approx(float((1 - alpha) * ce + alpha * kd.mean()), rel=1e-4)


def _run(*args):
    proc = subprocess.run(
        [sys.executable, str(FIDELITY / "run.py"), *args], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_quick_run_end_to_end(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    _run("--quick", "--out", str(out), "--workdir", str(tmp_path / "work"))

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


def test_quick_regimes_end_to_end(tmp_path):
    """--regimes: a sharpened teacher (its caches hold more of its mass) and alpha = 0.5, one table each; and the
    study under --teacher-temperature and --alpha, which says so at the top of its RESULTS.md."""
    pytest.importorskip("matplotlib")
    out, work = tmp_path / "out", str(tmp_path / "work")
    _run("--quick", "--regimes", "--out", str(out), "--workdir", work)
    text = (out / "RESULTS_regimes.md").read_text()
    sections = text.split("\n## ")[1:]
    assert [s.split("\n")[0] for s in sections[:2]] == [r.title for r in fidelity_run.REGIMES]
    for section, names in zip(sections, [("ce", "dense", "topk64_bucket", "topk64_renormalize", "sampled50"),
                                         ("ce", "dense", "topk64_bucket")], strict=False):  # fmt: skip
        rows = {
            line.split("|")[1].strip(): line for line in section.splitlines() if line.startswith("| ") and "±" in line
        }
        assert tuple(rows) == names
        for line in rows.values():
            numbers = [float(x) for x in re.findall(NUMBER, line.split("|", 2)[2])]
            assert len(numbers) >= 14 and all(math.isfinite(x) for x in numbers), line
        assert rows["dense"].split("|")[-2].strip().startswith("100.0")  # KL gap closed by dense KD itself
    confident, mixed = json.loads((out / "results_regimes.json").read_text())
    assert confident["info"]["teacher_temperature"] == 0.55 and confident["info"]["setup"]["alpha"] == 1.0
    assert mixed["info"]["teacher_temperature"] == 1.0 and mixed["info"]["setup"]["alpha"] == 0.5
    assert confident["caches"]["topk64"]["teacher_mass"] > mixed["caches"]["topk64"]["teacher_mass"]
    # a sharper teacher is further from every student than the flat one
    assert confident["per_seed"][0]["ce"]["kl"] > mixed["per_seed"][0]["ce"]["kl"]

    _run(
        "--quick",
        "--teacher-temperature",
        "0.55",
        "--alpha",
        "0.5",
        "--steps",
        "2",
        "--out",
        str(out),
        "--workdir",
        work,
    )
    text = (out / "RESULTS.md").read_text()
    assert text.startswith("# Fidelity") and "**Regime: teacher logits / 0.55, alpha = 0.5**" in text
    assert LAST_LINE.fullmatch(text.rstrip("\n").splitlines()[-1])
    assert json.loads((out / "results.json").read_text())["info"]["setup"]["alpha"] == 0.5


def test_student_config_defaults_to_the_demo_studys_student():
    assert study.student_config() == dict(
        hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4
    )
    student = study.make_student(4096, 32, 0)
    assert 0.35e6 < sum(p.numel() for p in student.parameters()) < 0.37e6
    assert (
        study.student_config(256, 4)["intermediate_size"] == 684
        and study.student_config(256)["num_attention_heads"] == 16
    )


def test_teacher_metrics_match_a_direct_computation():
    torch.manual_seed(4)
    ids = torch.randint(0, 40, (5, 9))
    probs = torch.softmax(torch.randn(5, 8, 40) * 2, -1)
    held = study.HeldOut(ids, [probs[:3], probs[3:]], 0.0, 3)
    got = study.teacher_metrics(held, top=7)
    labels = ids[:, 1:]
    assert got["ce"] == pytest.approx(float(-probs.gather(-1, labels[..., None]).log().mean()), rel=1e-6)
    assert got["top7_mass"] == pytest.approx(float(probs.topk(7, -1).values.sum(-1).mean()), rel=1e-6)
    top_p, top_id = probs.max(-1)
    assert got["ece"] == pytest.approx(study.ece(top_p.flatten().numpy(), (top_id == labels).flatten().numpy()))


def test_interleave_keeps_each_order_and_balances_characters():
    a = [f"a{i}" * (1 + i % 7) for i in range(40)]
    b = [f"b{i}" * (3 + i % 5) for i in range(25)]
    merged = real.interleave(a, b)
    assert [t for s, t in merged if s == 0] == a and [t for s, t in merged if s == 1] == b
    chars = [0, 0]
    for source, text in merged:
        if chars[0] < sum(map(len, a)) and chars[1] < sum(map(len, b)):  # while both last, neither runs ahead
            assert abs(chars[0] - chars[1]) <= max(map(len, a + b))
        chars[source] += len(text)


def test_english_documents_hold_out_every_fifth_topic():
    from pydoc_data.topics import topics

    train, validation = real.english_documents()
    names = sorted(topics)
    assert "".join(validation).replace("\n\n", "") == "".join(topics[n] for n in names[4::5]).replace("\n\n", "")
    assert len(train) > 3 * len(validation) > 0
    assert sum(len(d) < 1500 for d in train) <= len(names) - len(names[4::5])  # only a topic's last piece is short


def test_real_plan_and_per_run_alpha():
    runs = real.plan()
    names = [r.name for r in runs]
    assert names[:2] == ["ce", "dense"] and len(set(names)) == len(names)
    assert {"topk16_bucket", "topk64_renormalize", "sampled12", "sampled50", real.MIX.name} <= set(names)
    assert names.index(real.MIX.name) == names.index("topk64_renormalize") + 1  # top-64 targets loaded once
    setup = study.Setup(steps=1, batch=1, seq_len=8, lr=1.0, eval_seqs=1, alpha=1.0)
    assert real.MIX.mix(setup) == 0.5 and runs[0].mix(setup) == 1.0


def test_real_study_end_to_end_with_the_demo_teacher(tmp_path):
    """real.py's corpus, runs, run_study path and RESULTS_real.md, with the demo teacher (and its tokenizer) in place
    of SmolLM2; only the GGUF conversion is left out."""
    pytest.importorskip("matplotlib")
    corpus, sources = real.write_corpus(tmp_path, demo.teacher_path())
    assert set(sources["train"]) == {"python", "english"}
    setup = study.Setup(steps=2, batch=2, seq_len=32, lr=3e-3, eval_seqs=2, angle_seqs=2, hidden=16, layers=1)
    info = {
        "command": "test",
        "threads": 1,
        "quick": True,
        "convert_seconds": "reused",
        **real.describe(setup, "quick", str(demo.teacher_path()), corpus, sources, "float32"),
    }
    assert sum(info["train_sources"].values()) == (setup.steps * setup.batch + setup.angle_seqs) * setup.seq_len
    out = tmp_path / "out"
    write = functools.partial(report.write_results, out, flavour=real.REAL)
    fidelity_run.run_study(
        real.plan(), real.CACHES, setup, 1, str(tmp_path / "caches"), str(demo.teacher_path()), info, write, corpus
    )
    text = (out / "RESULTS_real.md").read_text()
    match = LAST_LINE_REAL.fullmatch(text.rstrip("\n").splitlines()[-1])
    assert match and all(math.isfinite(float(x)) for x in match.groups()), text.splitlines()[-1]
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ") and "±" in line}
    assert list(rows) == [r.name for r in real.plan()]
    assert "Reduced size (quick)" in text and (out / "fidelity_real.png").read_bytes()[:4] == b"\x89PNG"
    results = json.loads((out / "results_real.json").read_text())
    (seed,) = results["per_seed"]
    assert seed["dense"]["angle_init"] < 1e-3
    assert all(0 <= r["ece"] <= 1 and r["kl"] >= 0 and math.isfinite(r["ce"]) for r in seed.values())
    assert 0 < results["info"]["teacher_eval"]["top64_mass"] <= 1 + 1e-6
    # the mix trains on another loss than pure top-64/bucket from the same start and data
    assert seed[real.MIX.name]["ce"] != seed["topk64_bucket"]["ce"]
