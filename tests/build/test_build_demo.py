"""The embedded default: `softcache build` with no --teacher/--data builds the demo cache from the shipped teacher."""

from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner
from softcache.cli.main import main

import softcache
from softcache.demo import corpus_path, teacher_path


def test_demo_assets_are_shipped_small_and_loadable():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    demo = teacher_path().parent
    size = sum(p.stat().st_size for p in demo.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert size <= 20 * 2**20
    assert "PSF" in (demo / "LICENSES.md").read_text()
    tokenizer = AutoTokenizer.from_pretrained(teacher_path())
    model = AutoModelForCausalLM.from_pretrained(teacher_path())
    assert model.config.vocab_size == len(tokenizer) == 4096
    stats = json.loads((teacher_path() / "training.json").read_text())
    assert stats["heldout_loss"] < stats["unigram_loss"]  # it learned something beyond token frequencies
    assert corpus_path("train").exists() and corpus_path("validation").exists()


def test_cli_without_teacher_or_data_builds_the_demo(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["build", "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output and f"softcache info {out}" in result.output
    cache = softcache.open_cache(out)
    meta = cache.manifest["metadata"]
    assert len(cache) == meta["data"]["rows"] == 18 and cache.manifest.build_state.complete
    assert meta["teacher"]["path"] == str(teacher_path())
    rec = cache[0]
    assert rec["target_ids"].shape == (len(rec["input_ids"]), 32)
    # a real (if small) teacher: its top-32 holds far more than the 32/4096 a uniform guess would
    ids, lp = cache.targets(0, 1.0)
    assert np.exp(lp).sum(-1).mean() > 0.2
    again = CliRunner().invoke(main, ["build", "--out", str(out), "-q"])
    assert again.exit_code == 0 and "nothing to do" in again.output
