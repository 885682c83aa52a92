"""Distil a tiny student from a softcache cache with PyTorch Lightning.

python examples/lightning_train.py --steps 100            # builds the demo cache first
python examples/lightning_train.py --cache my-cache/ --temperature 2.0 --alpha 0.5
"""

import lightning as L
import torch
from common import demo_cache, parse_args, tiny_student
from torch.utils.data import DataLoader, Subset

import softcache
from softcache.integrations.lightning import DistillationModule


def main():
    args = parse_args(__doc__.splitlines()[0])
    L.seed_everything(0, verbose=False)
    dataset = softcache.SoftTargetDataset(demo_cache(args), temperature=args.temperature, max_length=args.max_length)
    held_out = max(1, len(dataset) // 8)
    train = DataLoader(Subset(dataset, range(len(dataset) - held_out)), batch_size=args.batch_size, shuffle=True,
                       collate_fn=softcache.collate)  # fmt: skip
    evaluation = DataLoader(Subset(dataset, range(len(dataset) - held_out, len(dataset))),
                            batch_size=args.batch_size, collate_fn=softcache.collate)  # fmt: skip
    module = DistillationModule(tiny_student(dataset.vocab_size, args), dataset=dataset, alpha=args.alpha,
                                learning_rate=args.lr)  # fmt: skip
    trainer = L.Trainer(max_steps=args.steps, accelerator="gpu" if torch.cuda.is_available() else "cpu", devices=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, log_every_n_steps=1)  # fmt: skip
    before = trainer.validate(module, evaluation, verbose=False)[0]["val_loss"]
    trainer.fit(module, train)
    after = trainer.validate(module, evaluation, verbose=False)[0]["val_loss"]
    print(f"held-out distillation loss: {before:.4f} before, {after:.4f} after {args.steps} steps", flush=True)


if __name__ == "__main__":
    main()
