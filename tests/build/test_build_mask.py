"""Loss masks: a chat build trains only the assistant turns, a prompt/completion build only the completions.

The reference mask is transformers' own ``return_assistant_tokens_mask`` on a template with ``{% generation %}``
blocks; the same conversations rendered by a template without them (turn boundaries) must give the same mask.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from transformers import AutoTokenizer

import softcache
from softcache.build import build

ROLE = "{{ '<' + m['role'] + '>' }}"
WITH_GENERATION = (
    "{% for m in messages %}" + ROLE + "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}"
    "{{ eos_token }}{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}"
)
WITHOUT_GENERATION = (
    "{% for m in messages %}" + ROLE + "{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}"
)


def conversations(text: list[str], n: int = 9) -> list[list[dict]]:
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        turns = []
        for _ in range(1 + i % 3):
            turns.append({"role": "user", "content": str(rng.choice(text))[:30]})
            turns.append({"role": "assistant", "content": str(rng.choice(text))})
        if i % 4 == 0:
            turns.insert(0, {"role": "system", "content": "be brief"})
        out.append(turns)
    return out


@pytest.fixture(scope="module")
def chat_teachers(teacher, tmp_path_factory):
    """The tiny teacher twice: with a chat template that marks generations, and with one that does not."""
    out = {}
    for name, template in (("generation", WITH_GENERATION), ("turns", WITHOUT_GENERATION)):
        path = tmp_path_factory.mktemp(name)
        shutil.copytree(teacher, path, dirs_exist_ok=True)
        tok = AutoTokenizer.from_pretrained(path)
        tok.chat_template = template
        tok.save_pretrained(path)
        out[name] = path
    return out


@pytest.fixture(scope="module")
def chat_data(text, tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations(text)))
    return path


def reference_masks(teacher_path, convs) -> list[np.ndarray]:
    tok = AutoTokenizer.from_pretrained(teacher_path)
    tok.chat_template = WITH_GENERATION
    return [
        np.asarray(tok.apply_chat_template(c, return_dict=True, return_assistant_tokens_mask=True)["assistant_masks"],
                   bool)
        for c in convs
    ]


@pytest.mark.parametrize("template", ["generation", "turns"])
def test_chat_cache_trains_only_the_assistant_turns(template, chat_teachers, chat_data, text, tmp_path):
    out = tmp_path / "c"
    build(str(chat_teachers[template]), str(chat_data), str(out), chat_template=True, k=4, max_length=256, quiet=True)
    cache = softcache.open_cache(out)
    assert cache.manifest.extras == {"loss_mask": {}} and cache.manifest.format_version == 2
    meta = cache.manifest.metadata["loss_mask"]
    assert meta["mode"] == "assistant"
    assert meta["source"] == ("{% generation %} blocks" if template == "generation" else "rendered turn boundaries")
    expected = reference_masks(chat_teachers["generation"], conversations(text))
    assert len(cache) == len(expected)
    ds = softcache.SoftTargetDataset(out)
    for i, want in enumerate(expected):
        rec = cache[i]
        np.testing.assert_array_equal(rec["loss_mask"], want)
        assert 0 < want.sum() < len(want)  # a real mask: some of each
        stored = (rec["target_ids"] >= 0).any(-1)
        np.testing.assert_array_equal(stored, np.append(want[1:], False))  # targets only where the next is trained
        labels = ds[i]["labels"]
        np.testing.assert_array_equal(labels != -100, want)
        np.testing.assert_array_equal(labels[want], rec["input_ids"][want])
    assert meta["trained_tokens"] == sum(int(m.sum()) for m in expected)


def test_mask_all_keeps_every_token(chat_teachers, chat_data, tmp_path):
    build(str(chat_teachers["generation"]), str(chat_data), str(tmp_path / "c"), chat_template=True, mask="all",
          k=4, max_length=256, quiet=True)
    cache = softcache.open_cache(tmp_path / "c")
    assert cache.manifest.extras == {} and cache.manifest.format_version == 1 and "loss_mask" not in cache[0]
    assert (softcache.SoftTargetDataset(cache)[0]["labels"] != -100).all()


def test_packed_chat_keeps_the_mask(chat_teachers, chat_data, text, tmp_path):
    build(str(chat_teachers["generation"]), str(chat_data), str(tmp_path / "c"), chat_template=True, pack=True,
          max_length=40, k=4, quiet=True)
    cache = softcache.open_cache(tmp_path / "c")
    tok = AutoTokenizer.from_pretrained(chat_teachers["generation"])
    stream = np.concatenate([np.append(m, False) for m in reference_masks(chat_teachers["generation"],
                                                                          conversations(text))])
    got = np.concatenate([cache[i]["loss_mask"] for i in range(len(cache))])
    np.testing.assert_array_equal(got, stream)  # the separator (EOS) between documents is never trained
    ids = np.concatenate([cache[i]["input_ids"] for i in range(len(cache))])
    assert (ids[~np.append(stream[1:], True) & (ids == tok.eos_token_id)]).size  # separators are there


def test_prompt_completion_trains_the_completion_and_its_eos(teacher, text, tmp_path):
    rows = [{"prompt": text[i][:12], "completion": text[i][12:]} for i in range(5)]
    data = tmp_path / "pc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    build(str(teacher), str(data), str(tmp_path / "c"), mask="completion", k=4, quiet=True)
    cache = softcache.open_cache(tmp_path / "c")
    tok = AutoTokenizer.from_pretrained(teacher)
    for i, row in enumerate(rows):
        rec = cache[i]
        prompt = len(tok(row["prompt"])["input_ids"])
        assert rec["input_ids"][-1] == tok.eos_token_id
        assert not rec["loss_mask"][:prompt].any() and rec["loss_mask"][prompt:].all()
        assert tok.decode(rec["input_ids"][prompt:-1]) == row["completion"]


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(mask="assistant"), "--mask assistant needs --chat-template"),
        (dict(mask="completion"), "needs columns prompt and completion"),
        (dict(mask="completion", chat_template=True), "drop --chat-template"),
    ],
)
def test_mask_errors_name_the_option(options, message, teacher, data, tmp_path):
    with pytest.raises(ValueError, match=message):
        build(str(teacher), str(data), str(tmp_path / "c"), quiet=True, **options)
