"""The trainers check the student's tokenizer (``processing_class``, or ``tokenizer=``) against the cache's tokenizer
fingerprint at start-up: a different vocabulary maps the same ids to other tokens, so training would be silently wrong.
"""

import pytest
import transformers

import softcache
from softcache.demo import teacher_path
from softcache.integrations.hf import DistillationTrainer


def _tokenizers():
    same = transformers.AutoTokenizer.from_pretrained(teacher_path())
    other = transformers.AutoTokenizer.from_pretrained(teacher_path())
    other.add_tokens(["<a-token-the-teacher-never-had>"])
    return same, other


def test_a_different_student_tokenizer_is_refused(demo_cache, student, arguments, tmp_path):
    ds = softcache.SoftTargetDataset(demo_cache)
    same, other = _tokenizers()
    model = student(vocab=ds.vocab_size + 64)
    with pytest.raises(ValueError, match="tokenizer mismatch.*train with the teacher's tokenizer"):
        DistillationTrainer(model=model, args=arguments(tmp_path), train_dataset=ds, processing_class=other)
    trainer = DistillationTrainer(model=model, args=arguments(tmp_path), train_dataset=ds, processing_class=same)
    assert trainer.distillation.vocab_size == ds.vocab_size


def test_the_hf_dataset_view_checks_the_tokenizer_too(demo_cache, student, arguments, tmp_path):
    train = softcache.to_hf_dataset(demo_cache)
    _, other = _tokenizers()
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        DistillationTrainer(model=student(vocab=softcache.open_cache(demo_cache).vocab_size), args=arguments(tmp_path),
                            train_dataset=train, processing_class=other)  # fmt: skip
