"""softcache build --objective mlm: BERT's seeded masking rule, the corrupted ids and labels stored, targets only at
the masked positions and equal to the teacher's own forward over the corrupted ids (unshifted), copies, resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import softcache
from softcache.build import build
from softcache.build.teacher import MaskedLMHead
from softcache.extras import MLMLabels

OPTS = dict(k=5, max_length=24, pack=True, batch_tokens=96, shard_tokens=150, quiet=True, objective="mlm",
            temperatures=(1.0, 2.0))
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_bert(path, text):
    """A 2-layer BertForMaskedLM (hidden 32) and a WordPiece tokenizer of ~200 tokens with [MASK]."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(text, trainers.WordPieceTrainer(vocab_size=200, special_tokens=SPECIAL))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls),
                                                                                               ("[SEP]", sep)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                        sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    model = BertForMaskedLM(config)
    with torch.no_grad():
        model.cls.predictions.decoder.weight.mul_(5)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bert(tmp_path_factory, text):
    return make_bert(tmp_path_factory.mktemp("bert"), text)


@pytest.fixture(scope="module")
def reference(bert, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "cache"
    build(str(bert), str(data), str(out), mask_copies=2, hidden_states=[-1], **OPTS)
    return softcache.open_cache(out)


def test_masking_rule_proportions_and_seeding():
    extra = MLMLabels(0.15)
    ids = np.arange(200_000) % 97 + 5
    ids[::10] = 2  # a special token: never chosen
    corrupted, labels = extra.corrupt(ids, mask_id=4, vocab_size=102, special_ids=[0, 1, 2, 3, 4], seed=1, index=7,
                                      copy=0)  # fmt: skip
    chosen = labels >= 0
    assert not chosen[::10].any()
    np.testing.assert_array_equal(labels[chosen], ids[chosen])
    np.testing.assert_array_equal(corrupted[~chosen], ids[~chosen])
    assert abs(chosen.sum() / (len(ids) * 0.9) - 0.15) < 0.005
    masked = corrupted[chosen] == 4
    kept = corrupted[chosen] == ids[chosen]
    assert abs(masked.mean() - 0.8) < 0.01
    assert abs(kept.mean() - (0.1 + 0.1 / 102)) < 0.01  # a random replacement may draw the same id
    assert abs((~masked & ~kept).mean() - 0.1 * 101 / 102) < 0.01
    again = extra.corrupt(ids, mask_id=4, vocab_size=102, special_ids=[0, 1, 2, 3, 4], seed=1, index=7, copy=0)
    np.testing.assert_array_equal(again[0], corrupted)
    other = extra.corrupt(ids, mask_id=4, vocab_size=102, special_ids=[0, 1, 2, 3, 4], seed=1, index=7, copy=1)
    assert (other[1] != labels).any()


def test_targets_are_the_teachers_at_masked_positions(bert, reference):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    cache = reference
    assert cache.manifest.extras["mlm_labels"] == {"objective": "mlm", "probability": 0.15, "copies": 2}
    tokenizer = AutoTokenizer.from_pretrained(bert)
    model = AutoModelForMaskedLM.from_pretrained(bert).eval()
    masked_total = 0
    for i in range(len(cache)):
        rec = cache[i]
        labels, ids = rec["mlm_labels"], rec["input_ids"]
        chosen = labels >= 0
        masked_total += chosen.sum()
        assert not np.isin(labels[chosen], tokenizer.all_special_ids).any()
        assert ((rec["target_ids"] >= 0).any(1) == chosen).all()  # targets only where masked
        with torch.no_grad():
            out = model(input_ids=torch.from_numpy(ids)[None], output_hidden_states=True)
        logp = torch.log_softmax(out.logits[0].double(), -1)
        top = torch.topk(logp, 5, -1)
        np.testing.assert_array_equal(rec["target_ids"][chosen], top.indices[chosen].numpy())
        np.testing.assert_allclose(rec["target_logprobs"][chosen], top.values[chosen].numpy(), atol=1 / 64)
        t_ids, t_lp = cache.targets(i, temperature=2.0)
        want = torch.log_softmax(out.logits[0].double() / 2, -1).gather(-1, top.indices)
        np.testing.assert_allclose(t_lp[chosen], want[chosen].numpy(), atol=1 / 64)
        np.testing.assert_allclose(rec["teacher_hidden"][2], out.hidden_states[-1][0].numpy(), rtol=2**-7, atol=1e-5)
    assert masked_total > 0
    # the two copies of a sequence: the same original tokens, masked differently
    a, b = cache[0], cache[1]
    restore = lambda r: np.where(r["mlm_labels"] >= 0, r["mlm_labels"], r["input_ids"])  # noqa: E731
    np.testing.assert_array_equal(restore(a), restore(b))
    assert (a["mlm_labels"] != b["mlm_labels"]).any()


def test_dataset_items_are_unshifted(reference):
    ds = softcache.SoftTargetDataset(reference, temperature=2.0)
    assert ds.causal is False
    item = ds[0]
    rec = reference[0]
    np.testing.assert_array_equal(item["input_ids"], rec["input_ids"])
    np.testing.assert_array_equal(item["labels"], np.where(rec["mlm_labels"] >= 0, rec["mlm_labels"], -100))
    assert "mlm_labels" not in item and 2 in item["teacher_hidden"]


def test_rebuild_is_identical_and_resume(bert, data, reference, assert_same_cache, tmp_path, monkeypatch):
    out = tmp_path / "cache"
    original, calls = MaskedLMHead.batch_targets, []

    def fail_late(self, *args):
        calls.append(1)
        if len(calls) == 12:  # in the second window (768 tokens, 8 batches each)
            raise RuntimeError("injected failure")
        return original(self, *args)

    monkeypatch.setattr(MaskedLMHead, "batch_targets", fail_late)
    with pytest.raises(RuntimeError, match="injected"):
        build(str(bert), str(data), str(out), mask_copies=2, hidden_states=[-1], **OPTS)
    monkeypatch.setattr(MaskedLMHead, "batch_targets", original)
    partial = len(softcache.open_cache(out))
    assert 0 < partial < len(reference)
    result = build(str(bert), str(data), str(out), mask_copies=2, hidden_states=[-1], **OPTS)
    assert result.resumed_sequences == partial
    assert_same_cache(softcache.open_cache(out), reference)


def test_options_are_checked(bert, data, tmp_path):
    with pytest.raises(ValueError, match="need --objective mlm"):
        build(str(bert), str(data), str(tmp_path / "a"), mask_copies=2, quiet=True)
    with pytest.raises(ValueError, match="probability"):
        build(str(bert), str(data), str(tmp_path / "b"), **{**OPTS, "mlm_probability": 1.5})
    with pytest.raises(ValueError, match="no --mask"):
        build(str(bert), str(data), str(tmp_path / "c"), mask="completion", **OPTS)


def test_cli_sampled_targets(bert, data, tmp_path):
    from click.testing import CliRunner
    from softcache.cli.main import main

    out = tmp_path / "s"
    result = CliRunner().invoke(main, ["build", "--teacher", str(bert), "--data", str(data), "--out", str(out),
                                       "--objective", "mlm", "--mlm-probability", "0.3", "--targets", "sampled",
                                       "--samples", "20", "--k", "20", "--max-length", "24", "--limit", "6", "-q"])
    assert result.exit_code == 0, result.output
    cache = softcache.open_cache(out)
    assert cache.manifest.extras["mlm_labels"]["probability"] == 0.3
    for i in range(len(cache)):
        rec = cache[i]
        has = (rec["target_counts"] > 0).any(1)
        assert (has == (rec["mlm_labels"] >= 0)).all()
        assert (rec["target_counts"].sum(1)[has] == 20).all()


def test_verify_convert_stats(reference, assert_same_cache, tmp_path):
    from softcache.ops.convert import convert
    from softcache.ops.stats import position_stats
    from softcache.ops.verify import verify

    assert verify(reference.url).ok
    zarr = convert(reference.url, str(tmp_path / "z"), "zarr")
    assert_same_cache(zarr, reference)
    assert verify(zarr.url).ok
    stats = position_stats(zarr)
    assert all(len(v) == sum((zarr[i]["mlm_labels"] >= 0).sum() for i in range(len(zarr))) for v in stats.values())


def test_batches_without_a_masked_token(bert, data, tmp_path):
    build(str(bert), str(data), str(tmp_path / "c"), **{**OPTS, "mlm_probability": 0.01, "batch_tokens": 24})
    cache = softcache.open_cache(tmp_path / "c")
    empty = [i for i in range(len(cache)) if (cache[i]["mlm_labels"] < 0).all()]
    assert empty and all((cache[i]["target_ids"] < 0).all() for i in empty)
    assert any((cache[i]["target_ids"] >= 0).any() for i in range(len(cache)))
