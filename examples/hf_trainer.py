"""Distil a tiny student from a softcache cache with the Hugging Face Trainer.

    python examples/hf_trainer.py --steps 100                 # builds the demo cache first
    python examples/hf_trainer.py --cache my-cache/ --temperature 2.0 --alpha 0.5

``DistillationTrainer`` is a ``transformers.Trainer``: every ``TrainingArguments`` option works (gradient
accumulation is exact, ``remove_unused_columns`` keeps the targets, bf16, torchrun, ...).
"""

import tempfile

import torch
import transformers
from common import demo_cache, parse_args, tiny_student
from torch.utils.data import Subset

import softcache
from softcache.integrations.hf import DistillationTrainer


def main():
    args = parse_args(__doc__.splitlines()[0])
    torch.manual_seed(0)
    dataset = softcache.SoftTargetDataset(demo_cache(args), temperature=args.temperature, max_length=args.max_length)
    held_out = max(1, len(dataset) // 8)
    train = Subset(dataset, range(len(dataset) - held_out))
    evaluation = Subset(dataset, range(len(dataset) - held_out, len(dataset)))
    student = tiny_student(dataset.vocab_size, args)
    training = transformers.TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="softcache-hf-"), max_steps=args.steps,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
        learning_rate=args.lr, lr_scheduler_type="constant", logging_steps=max(1, args.steps // 10),
        save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
    )  # fmt: skip
    # The trainer takes the temperature from the dataset and checks the student's vocabulary against the cache.
    trainer = DistillationTrainer(model=student, args=training, train_dataset=train, eval_dataset=evaluation,
                                  alpha=args.alpha)  # fmt: skip
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    print(f"held-out distillation loss: {before:.4f} before, {after:.4f} after {args.steps} steps", flush=True)


if __name__ == "__main__":
    main()
