"""Bad inputs to the teacher pass give one clear error naming the file, column, option or sequence."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from softcache.cli.main import main

import softcache
from softcache.build import build


def test_missing_field_names_the_columns(teacher, data, tmp_path):
    with pytest.raises(ValueError, match=r"docs.jsonl has no column 'body'; its columns are \['text'\].*--field"):
        build(str(teacher), str(data), str(tmp_path / "c"), field="body", quiet=True)


def test_empty_dataset(teacher, write_jsonl, tmp_path):
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", ""])
    with pytest.raises(ValueError, match=r"empty.jsonl: all 2 rows are empty after tokenisation"):
        build(str(teacher), str(empty), str(tmp_path / "c"), quiet=True)
    (tmp_path / "header.csv").write_text("text\n")
    with pytest.raises(ValueError, match=r"header.csv: cannot be read as csv .*corresponds to no data.*empty"):
        build(str(teacher), str(tmp_path / "header.csv"), str(tmp_path / "c"), quiet=True)
    (tmp_path / "zero.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"zero.jsonl: cannot be read as json .*empty or damaged"):
        build(str(teacher), str(tmp_path / "zero.jsonl"), str(tmp_path / "c"), quiet=True)


def test_tokenizer_larger_than_the_teachers_vocabulary(data, make_teacher, tmp_path):
    small = make_teacher(tmp_path / "small", vocab_extra=-20)
    with pytest.raises(ValueError, match=r"the tokenizer has (\d+) tokens but the model's output layer only"):
        build(str(small), str(data), str(tmp_path / "c"), quiet=True)


def test_k_larger_than_the_vocabulary(teacher, data, tmp_path):
    with pytest.raises(ValueError, match=r"--k 5000 is larger than the teacher's vocabulary \(\d+\)"):
        build(str(teacher), str(data), str(tmp_path / "c"), k=5000, quiet=True)


def test_non_empty_out_is_refused_even_with_overwrite(teacher, data, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=r"mine exists, is not empty and is not a softcache cache"):
            build(str(teacher), str(data), str(out), overwrite=overwrite, quiet=True)
    assert (out / "notes.txt").read_text() == "keep me"


def test_nan_logits_name_the_sequence_or_are_skipped_and_counted(data, make_teacher, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_teacher(tmp_path / "nan")
    tok = AutoTokenizer.from_pretrained(path)
    poison = tok("print")["input_ids"][0]  # only some documents contain it
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.model.embed_tokens.weight[poison] = float("nan")
    model.save_pretrained(path)
    docs = [json.loads(line)["text"] for line in data.read_text().splitlines()]
    first_bad = next(i for i, d in enumerate(docs) if poison in tok(d)["input_ids"][:64])
    opts = dict(k=4, max_length=64, quiet=True)
    with pytest.raises(ValueError, match=rf"NaN.*in sequence {first_bad} \(dataset row {first_bad}\).*--skip-bad"):
        build(str(path), str(data), str(tmp_path / "c"), **opts)
    result = build(str(path), str(data), str(tmp_path / "c"), skip_bad=True, **opts)
    bad = [i for i, d in enumerate(docs) if poison in tok(d)["input_ids"][:64]]
    state = softcache.open_cache(tmp_path / "c").manifest.build_state
    assert state.skipped_bad == bad and result.skipped_bad == len(bad) and result.sequences == len(docs) - len(bad)


def test_cli_build_and_its_errors(teacher, data, tmp_path):
    runner = CliRunner()
    args = ["build", "--teacher", str(teacher), "--data", str(data), "--out", str(tmp_path / "c"), "-q"]
    ok = runner.invoke(main, [*args, "--k", "4", "--temperatures", "1,2", "--max-length", "32", "--pack"])
    assert ok.exit_code == 0, ok.output
    assert "wrote" in ok.output and "tokens/s" in ok.output
    assert softcache.open_cache(tmp_path / "c").temperatures == [1.0, 2.0]
    bad = runner.invoke(main, [*args, "--k", "9999"])
    assert bad.exit_code == 1 and "error: --k 9999 is larger than the teacher's vocabulary" in bad.output
    half = runner.invoke(main, ["build", "--teacher", str(teacher)])
    assert half.exit_code == 1 and "give both --teacher and --data" in half.output
