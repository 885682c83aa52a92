"""DistilBERT from a cache: a masked-LM teacher's targets at the masked positions (``softcache build --objective
mlm``, two differently-masked copies of each sequence) and its last hidden states, then a student with half its
layers trained on soft cross-entropy at T = 2 + its own MLM loss + the cosine between last hidden states.

    python examples/distilbert.py --steps 100      # trains a tiny BERT teacher for a few seconds first

The teacher is a tiny BertForMaskedLM with a WordPiece tokenizer, both made here from the demo corpus and trained for
``2 × --steps`` steps (seconds); the student has the teacher's width (as DistilBERT) and a random init.
DistilBERT's weights 5 : 2 : 1 become alpha = 5/7 (soft vs MLM) and alpha_hidden = 1/7 of the KD loss's scale. The soft
term is the KL divergence, which differs from the soft cross-entropy by the teacher's entropy (a constant): same
gradients.
"""

import json
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import torch
import transformers
from common import parse_args

import softcache
from softcache.build import build
from softcache.demo import corpus_path
from softcache.extras import MLMLabels
from softcache.integrations.hf import DistillationTrainer

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tokenizer_for(texts) -> transformers.PreTrainedTokenizerFast:
    """A WordPiece tokenizer of 1000 tokens trained on ``texts``, with BERT's special tokens."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=1000, special_tokens=SPECIAL))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                                cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")  # fmt: skip


def bert(vocab: int, width: int, layers: int, max_length: int) -> transformers.BertForMaskedLM:
    config = transformers.BertConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers,
                                     num_attention_heads=max(1, width // 16), intermediate_size=4 * width,
                                     max_position_embeddings=max_length)  # fmt: skip
    return transformers.BertForMaskedLM(config)


def train_teacher(texts, tokenizer, args, steps: int) -> transformers.BertForMaskedLM:
    """A tiny BERT trained on the texts with BERT's masking (softcache's own rule), ``steps`` Adam steps."""
    teacher = bert(len(tokenizer), args.hidden, 2 * args.layers, args.max_length)
    length = min(args.max_length, 128)  # short sequences: a few seconds of training
    ids = [torch.tensor(x) for x in tokenizer(texts, truncation=True, max_length=length)["input_ids"]]
    rule, special = MLMLabels(0.15), tokenizer.all_special_ids
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=2e-3)
    teacher.train()
    for step in range(steps):
        batch = [ids[(step * 8 + j) % len(ids)] for j in range(8)]
        inputs = torch.nn.utils.rnn.pad_sequence(batch, batch_first=True, padding_value=tokenizer.pad_token_id)
        labels = torch.full_like(inputs, -100)
        for row, seq in enumerate(batch):
            corrupted, lab = rule.corrupt(seq.numpy(), mask_id=tokenizer.mask_token_id, vocab_size=len(tokenizer),
                                          special_ids=special, seed=1, index=step * 8 + row, copy=0)  # fmt: skip
            inputs[row, : len(seq)] = torch.from_numpy(corrupted)
            labels[row, : len(seq)] = torch.from_numpy(lab).masked_fill(torch.from_numpy(lab) < 0, -100)
        loss = teacher(input_ids=inputs, attention_mask=(inputs != tokenizer.pad_token_id).long(), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step in (0, steps - 1):
            print(f"teacher step {step + 1}: MLM loss {loss.item():.3f}", flush=True)
    return teacher.eval()


def mlm_cache(args, texts) -> str:
    """``args.cache`` when it is a masked-LM cache with hidden states; else a teacher trained here and its cache."""
    if args.cache:
        extras = softcache.open_cache(args.cache).manifest.extras
        if "mlm_labels" in extras and "hidden_states" in extras:
            return args.cache
    work = Path(tempfile.mkdtemp(prefix="softcache-distilbert-"))
    tokenizer = tokenizer_for(texts)
    teacher = train_teacher(texts, tokenizer, args, steps=2 * args.steps)
    teacher.save_pretrained(work / "teacher")
    tokenizer.save_pretrained(work / "teacher")
    (work / "data.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    print(f"building the masked-LM cache into {work / 'cache'} ...", flush=True)
    build(str(work / "teacher"), str(work / "data.jsonl"), str(work / "cache"), objective="mlm", mask_copies=2,
          hidden_states=[-1], k=32, temperatures=(2.0,), max_length=args.max_length, quiet=True)  # fmt: skip
    return str(work / "cache")


def main():
    args = parse_args(__doc__.splitlines()[0])
    torch.manual_seed(0)
    texts = [t for t in pq.read_table(corpus_path("train"), columns=["text"]).column("text").to_pylist() if t.strip()]
    texts = texts[: args.demo_limit]
    dataset = softcache.SoftTargetDataset(mlm_cache(args, texts), temperature=2.0, max_length=args.max_length)
    teacher_layers = dataset.cache.manifest.extras["hidden_states"]["layers"][-1]
    width = dataset.cache.manifest.extras["hidden_states"]["width"]
    student = bert(dataset.vocab_size, width, max(1, teacher_layers // 2), args.max_length)
    training = transformers.TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="softcache-distilbert-"), max_steps=args.steps,
        per_device_train_batch_size=args.batch_size, learning_rate=args.lr, lr_scheduler_type="constant",
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
    )  # fmt: skip
    trainer = DistillationTrainer(
        model=student, args=training, train_dataset=dataset, alpha=5 / 7, alpha_hidden=1 / 7, hidden_kind="cosine",
        layer_map={student.config.num_hidden_layers: teacher_layers},  # last hidden states ↔ the teacher's
    )  # fmt: skip
    assert trainer.distillation.causal is False  # chosen from the cache: labels and targets unshifted
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "hidden_loss" in entry]
    first, last = logs[0], logs[-1]
    print(f"after {args.steps} steps: loss {first['loss']:.4f} → {last['loss']:.4f}, soft KL (T=2) "
          f"{first['soft_loss']:.4f} → {last['soft_loss']:.4f}, MLM {first['hard_loss']:.4f} → "
          f"{last['hard_loss']:.4f}, cosine {first['hidden_loss']:.4f} → {last['hidden_loss']:.4f}", flush=True)


if __name__ == "__main__":
    main()
