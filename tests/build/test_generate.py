"""``softcache generate`` on the demo teacher: prompt + completion sequences whose completions decode to the text it
reports, whose targets at each completion position are those of a separate forward pass of the teacher (top-k ids
equal, log-probs within the codec bound), and whose prompt positions carry none; filtered samples are counted; a run
killed (SIGKILL or an exception) and rerun ends with the same cache."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from softcache.cli.main import main

import softcache
from softcache.build.generate import TEXTS_NAME, generate
from softcache.demo import corpus_path, teacher_path

ROOT = Path(__file__).resolve().parents[2]
STEP = 1.0 / 64  # the codec's log-prob step: decoded log-probs are within STEP / T of exact
SETTINGS = dict(max_new_tokens=10, temperature=0.9, top_p=0.95, num_return_sequences=2, seed=3, k=8,
                temperatures=(1.0, 2.0), batch_size=2, shard_tokens=48, quiet=True)  # fmt: skip


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    """Three short prompts cut from the demo corpus, in a ``prompt`` column."""
    texts = pd.read_parquet(corpus_path("validation"))["text"].tolist()
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    rows = [text[:n] for text, n in zip(texts[:3], (50, 30, 70), strict=True)]
    path.write_text("".join(json.dumps({"prompt": row}) + "\n" for row in rows))
    return path, rows


@pytest.fixture(scope="module")
def checker(prompts, tmp_path_factory):
    """A module ``checkers`` with ``keep(prompt, completion)``, rejecting the second prompt's samples: a filter that
    a rerun in another process names the same way (``--filter checkers:keep``)."""
    folder = tmp_path_factory.mktemp("checkers")
    (folder / "checkers.py").write_text(f"def keep(prompt, completion):\n    return prompt != {prompts[1][1]!r}\n")
    return folder


@pytest.fixture(scope="module")
def reference(prompts, tmp_path_factory):
    """An uninterrupted run; its filter records what it was shown and rejects the second prompt's samples."""
    path, rows = prompts
    out = tmp_path_factory.mktemp("generate") / "cache"
    seen = []

    def keep(prompt, completion):
        seen.append((prompt, completion))
        return prompt != rows[1]

    result = generate(str(teacher_path()), str(path), str(out), filter=keep, **SETTINGS)
    return out, result, seen


@pytest.fixture(scope="module")
def teacher():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(teacher_path()).eval(), AutoTokenizer.from_pretrained(teacher_path())


def test_completions_targets_and_text(reference, prompts, teacher):
    out, result, seen = reference
    model, tokenizer = teacher
    _, rows = prompts
    cache = softcache.open_cache(out)
    state = cache.manifest.build_state
    assert state.complete and state.rejected == [2, 3] and len(cache) == 4 == result.sequences
    assert result.rejected == 2 and len(seen) == 6 and "2 rejected" in result.summary()
    generation = cache.manifest.metadata["generation"]
    assert generation["max_new_tokens"] == 10 and generation["top_p"] == 0.95 and generation["temperature"] == 0.9
    assert generation["num_return_sequences"] == 2 and generation["seed"] == 3

    lines = (out / TEXTS_NAME).read_bytes()
    recorded = cache.manifest.metadata["generated_text"]
    assert recorded["sha256"] == hashlib.sha256(lines).hexdigest() and recorded["lines"] == 4
    texts = [json.loads(line) for line in lines.decode().splitlines()]
    assert [t["sample"] for t in texts] == [0, 1, 4, 5]
    for j, text in enumerate(texts):
        rec = cache[j]
        prompt = np.asarray(tokenizer(rows[text["prompt_index"]])["input_ids"])
        p, length = len(prompt), len(rec["input_ids"])
        completion = rec["input_ids"][p:]
        assert text["prompt"] == rows[text["prompt_index"]]
        np.testing.assert_array_equal(rec["input_ids"][:p], prompt)
        np.testing.assert_array_equal(rec["loss_mask"], np.arange(length) >= p)
        assert 1 <= len(completion) <= 10 and (len(completion) == 10 or completion[-1] == tokenizer.eos_token_id)
        # the text it reports (and showed the filter) is what the stored completion decodes to
        decoded = tokenizer.decode(completion, skip_special_tokens=True)
        assert text["completion"] == decoded == seen[text["sample"]][1]

        # targets: at p - 1 .. length - 2 those of a separate forward pass over prompt + completion; none elsewhere
        stored = np.arange(length)
        stored = (stored >= p - 1) & (stored < length - 1)
        assert (rec["target_ids"][~stored] == -1).all()
        with torch.no_grad():
            z = model(torch.from_numpy(rec["input_ids"])[None]).logits[0].double()
        for temperature in (1.0, 2.0):
            ids, logp = cache.targets(j, temperature=temperature)
            exact = torch.log_softmax(z / temperature, -1).numpy()
            top = np.argsort(-exact, -1, kind="stable")[:, :8]
            for t in np.flatnonzero(stored):
                if not np.array_equal(ids[t], top[t]):  # only a near-tie may swap ranks (the logits differ by ~1e-6)
                    gaps = -np.diff(np.sort(exact[t])[::-1][:9])
                    assert gaps.min() < 1e-4, (j, t, ids[t], top[t])
                assert np.abs(logp[t] - exact[t, ids[t]]).max() <= STEP / temperature + 1e-4, (j, t, temperature)


def test_cli_writes_the_same_cache(reference, prompts, checker, tmp_path, monkeypatch, assert_same_cache):
    path, _ = prompts
    monkeypatch.syspath_prepend(str(checker))
    args = ["generate", "--teacher", str(teacher_path()), "--prompts", str(path), "--out", str(tmp_path / "cache"),
            "--max-new-tokens", "10", "--temperature", "0.9", "--top-p", "0.95", "--num-return-sequences", "2",
            "--seed", "3", "--k", "8", "--temperatures", "1,2", "--batch-size", "2", "--shard-tokens", "48", "-q",
            "--filter", "checkers:keep"]  # fmt: skip
    run = CliRunner().invoke(main, args)
    assert run.exit_code == 0, run.output
    assert "4 samples of 3 prompts kept, 2 rejected" in run.output and "tokens/s" in run.output
    assert_same_cache(softcache.open_cache(tmp_path / "cache"), softcache.open_cache(reference[0]))
    assert (tmp_path / "cache" / TEXTS_NAME).read_bytes() == (reference[0] / TEXTS_NAME).read_bytes()
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and "nothing to do" in again.output


def test_sigkill_then_rerun_equals_uninterrupted(reference, prompts, checker, tmp_path, monkeypatch,
                                                  assert_same_cache):
    out = tmp_path / "cache"
    monkeypatch.syspath_prepend(str(checker))
    script = textwrap.dedent(f"""
        import os, signal
        from softcache.format import ShardWriter
        from softcache.build.generate import generate
        write_batch = ShardWriter.write_batch
        def write_then_die(self, streams, n):  # kill -9 with shard 0 committed and shard 1 written into
            write_batch(self, streams, n)
            if self.name.startswith("shard-00001"):
                os.kill(os.getpid(), signal.SIGKILL)
        ShardWriter.write_batch = write_then_die
        generate({str(teacher_path())!r}, {str(prompts[0])!r}, {str(out)!r}, filter="checkers:keep", **{SETTINGS!r})
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(checker), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == -9, proc.stderr[-3000:]
    killed = softcache.open_cache(out)
    assert 0 < len(killed) < 4 and not killed.manifest.build_state.complete
    assert not (out / TEXTS_NAME).exists()
    with pytest.warns(UserWarning, match="taking over the lock"):  # of the killed process
        result = generate(str(teacher_path()), str(prompts[0]), str(out), filter="checkers:keep", **SETTINGS)
    assert result.resumed_sequences > 0
    assert_same_cache(softcache.open_cache(out), softcache.open_cache(reference[0]))
    assert (out / TEXTS_NAME).read_bytes() == (reference[0] / TEXTS_NAME).read_bytes()


def test_exception_then_rerun_equals_uninterrupted(reference, prompts, tmp_path, monkeypatch, assert_same_cache):
    import softcache.build.generate as module

    out = tmp_path / "cache"
    original, calls = module._Generation.batch, []

    def fail_in_second_batch(self, a, b):
        calls.append(a)
        if len(calls) == 2:
            raise RuntimeError("injected failure")
        return original(self, a, b)

    monkeypatch.setattr(module._Generation, "batch", fail_in_second_batch)
    keep = lambda prompt, completion: prompt != prompts[1][1]  # noqa: E731
    with pytest.raises(RuntimeError, match="injected"):
        generate(str(teacher_path()), str(prompts[0]), str(out), filter=keep, **SETTINGS)
    monkeypatch.setattr(module._Generation, "batch", original)
    partial = softcache.open_cache(out)
    assert len(partial) == 2  # the first batch (prompts 0 and 1): samples 0 and 1 kept, 2 and 3 rejected
    consumed = len(partial) + len(partial.manifest.build_state.rejected)  # (rejections after the last commit: redone)
    rerun = generate(str(teacher_path()), str(prompts[0]), str(out), filter=keep, **SETTINGS)
    assert rerun.resumed_sequences == consumed
    assert_same_cache(softcache.open_cache(out), softcache.open_cache(reference[0]))


def test_options_are_checked_before_the_teacher_loads(prompts, tmp_path):
    for bad, match in (({"top_p": 0.0}, "--top-p"), ({"temperature": -1.0}, "--temperature"),
                       ({"num_return_sequences": 0}, "--num-return-sequences"), ({"filter": "nowhere:f"}, "--filter")):
        with pytest.raises(ValueError, match=match):
            generate(str(teacher_path()), str(prompts[0]), str(tmp_path / "cache"), **{**SETTINGS, **bad})
    (tmp_path / "texts.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(ValueError, match="no column 'prompt'"):
        generate(str(teacher_path()), str(tmp_path / "texts.jsonl"), str(tmp_path / "cache2"), **SETTINGS)


def test_torchrun_two_ranks_equals_one_process(reference, prompts, checker, tmp_path, assert_same_cache):
    """Each rank generates its batches of prompts (seeded per batch, so the samples do not depend on the ranks)."""
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "softcache.cli.main", "generate", "--teacher", str(teacher_path()), "--prompts", str(prompts[0]), "--out",
           str(out), "--max-new-tokens", "10", "--temperature", "0.9", "--top-p", "0.95", "--num-return-sequences",
           "2", "--seed", "3", "--k", "8", "--temperatures", "1,2", "--batch-size", "2", "--shard-tokens", "48", "-q",
           "--filter", "checkers:keep"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(checker), str(ROOT)])}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers
        raise
    assert proc.returncode == 0, stderr[-3000:]
    assert stdout.count("wrote") == 1 and "2 rejected" in stdout  # one summary, from rank 0
    two = softcache.open_cache(out)
    assert two.manifest.build_state.rejected == [2, 3] and two.manifest.metadata["build"]["world_size"] == 2
    assert_same_cache(two, softcache.open_cache(reference[0]))
    assert (out / TEXTS_NAME).read_bytes() == (reference[0] / TEXTS_NAME).read_bytes()
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("shard-")) == [TEXTS_NAME, "softcache.json"]


def test_chat_prompts_are_rendered_with_the_generation_prompt(tmp_path):
    """A ``messages`` column: rendered with the chat template and its generation prompt, trailing assistant turns
    dropped (the teacher answers them anew)."""
    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_path(), teacher)
    config = json.loads((teacher / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")  # fmt: skip
    (teacher / "tokenizer_config.json").write_text(json.dumps(config))
    chats = [[{"role": "user", "content": "def add(a, b):"}, {"role": "assistant", "content": "return a - b"}],
             [{"role": "system", "content": "Python"}, {"role": "user", "content": "import os"}]]  # fmt: skip
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats))
    generate(str(teacher), str(tmp_path / "chats.jsonl"), str(tmp_path / "cache"), max_new_tokens=4, k=4, quiet=True)
    texts = [json.loads(line) for line in (tmp_path / "cache" / TEXTS_NAME).read_text().splitlines()]
    assert [t["prompt"] for t in texts] == ["<|user|>def add(a, b):\n<|assistant|>",
                                            "<|system|>Python\n<|user|>import os\n<|assistant|>"]  # fmt: skip
    cache = softcache.open_cache(tmp_path / "cache")
    assert cache.manifest.metadata["generation"]["chat_template"] and len(cache) == 2
