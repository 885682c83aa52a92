"""The teacher pass (``softcache.build.build``) with tiny Llama teachers made from configs, on CPU."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch

import softcache
from softcache.build import build


@functools.lru_cache(maxsize=2)
def _float64_model(teacher_path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float64)


def reference_logits(teacher_path: Path, input_ids: np.ndarray) -> np.ndarray:
    model = _float64_model(teacher_path)
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(input_ids)[None]).logits[0].numpy()


def test_contents_are_topk_of_the_teachers_log_softmax(teacher, data, tmp_path):
    out = tmp_path / "cache"
    result = build(str(teacher), str(data), str(out), k=8, temperatures=(1.0, 2.0), max_length=40, pack=True,
                   batch_tokens=100, shard_tokens=150, quiet=True)
    cache = softcache.open_cache(out)
    assert result.sequences == len(cache) > 3 and result.shards == len(cache.manifest["shards"]) > 1
    step = cache.params.logprob_step
    for i in range(len(cache)):
        rec = cache[i]
        z = reference_logits(teacher, rec["input_ids"])
        for t in (1.0, 2.0):
            logp = torch.log_softmax(torch.from_numpy(z) / t, -1).numpy()
            ids, lp = cache.targets(i, t)
            top = np.argsort(-logp, axis=-1, kind="stable")[:, :8]
            np.testing.assert_array_equal(np.sort(ids, -1), np.sort(top, -1))
            np.testing.assert_allclose(lp, np.take_along_axis(logp, ids, -1), atol=step / t + 1e-5)


def test_packing_joins_documents_with_eos_and_truncation_keeps_row_order(teacher, text, write_jsonl, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher)
    docs = text[:5]
    data = write_jsonl(tmp_path / "d.jsonl", docs, field="content")
    packed = build(str(teacher), str(data), str(tmp_path / "p"), k=4, max_length=16, pack=True, field="content",
                   quiet=True)
    stream = np.concatenate([tok(d)["input_ids"] + [tok.eos_token_id] for d in docs])
    cache = softcache.open_cache(tmp_path / "p")
    np.testing.assert_array_equal(np.concatenate([cache[i]["input_ids"] for i in range(len(cache))]), stream)
    assert packed.tokens == len(stream) and max(len(cache[i]["input_ids"]) for i in range(len(cache))) == 16
    build(str(teacher), str(data), str(tmp_path / "t"), k=4, max_length=12, field="content", quiet=True)
    cache = softcache.open_cache(tmp_path / "t")
    assert len(cache) == len(docs)
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(cache[i]["input_ids"], tok(d)["input_ids"][:12])


def test_sampled_targets_do_not_depend_on_batching(teacher, data, assert_same_cache, tmp_path):
    opts = dict(k=30, targets="sampled", samples=30, temperatures=(1.0,), max_length=40, pack=True, seed=3,
                quiet=True)
    build(str(teacher), str(data), str(tmp_path / "a"), batch_tokens=80, **opts)
    build(str(teacher), str(data), str(tmp_path / "b"), batch_tokens=400, **opts)
    a, b = softcache.open_cache(tmp_path / "a"), softcache.open_cache(tmp_path / "b")
    assert_same_cache(a, b)
    rec = a[0]
    assert (rec["target_counts"].sum(-1) == 30).all()
    z = reference_logits(teacher, rec["input_ids"])
    p = torch.softmax(torch.from_numpy(z), -1).numpy()
    freq = np.zeros_like(p)
    np.put_along_axis(freq, np.maximum(rec["target_ids"], 0), rec["target_counts"] / 30, -1)
    # unbiased: the mean over positions of the estimated mass of each position's top id matches the truth
    top = p.argmax(-1)[:, None]
    truth, est = np.take_along_axis(p, top, -1).mean(), np.take_along_axis(freq, top, -1).mean()
    assert abs(truth - est) < 4 * np.sqrt(truth * (1 - truth) / (30 * len(p))) + 1e-3


def test_manifest_records_teacher_tokenizer_version_and_command(teacher, data, tmp_path):
    build(str(teacher), str(data), str(tmp_path / "c"), k=4, max_length=32, quiet=True, command="softcache build X")
    meta = softcache.open_cache(tmp_path / "c").manifest["metadata"]
    assert meta["teacher"]["path"] == str(teacher) and len(meta["teacher"]["config_sha256"]) == 64
    assert meta["teacher"]["dtype"] == "float32" and len(meta["tokenizer"]["vocab_sha256"]) == 64
    assert meta["softcache_version"] == softcache.__version__ and meta["command"] == "softcache build X"
    state = softcache.open_cache(tmp_path / "c").manifest.build_state
    assert state.complete is True and state.skipped_bad == []


def test_pretokenised_input_ids_and_chat_messages(teacher, tmp_path):
    from transformers import AutoTokenizer

    ids = [[5, 6, 7, 8, 9], [10, 11, 12]]
    data = tmp_path / "ids.jsonl"
    data.write_text("".join(json.dumps({"input_ids": x}) + "\n" for x in ids))
    build(str(teacher), str(data), str(tmp_path / "a"), k=4, quiet=True)
    cache = softcache.open_cache(tmp_path / "a")
    assert [cache[i]["input_ids"].tolist() for i in range(len(cache))] == ids

    chat_teacher = tmp_path / "chat"
    tok = AutoTokenizer.from_pretrained(teacher)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    tok.save_pretrained(chat_teacher)
    for name in ("config.json", "model.safetensors"):
        (chat_teacher / name).write_bytes((teacher / name).read_bytes())
    messages = [{"role": "user", "content": "print(1)"}, {"role": "assistant", "content": "1"}]
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": messages}) + "\n")
    build(str(chat_teacher), str(data), str(tmp_path / "b"), k=4, chat_template=True, quiet=True)
    expected = tok("user: print(1)\nassistant: 1\n", add_special_tokens=False)["input_ids"]
    assert softcache.open_cache(tmp_path / "b")[0]["input_ids"].tolist() == expected
