"""Distil a tiny student from a softcache cache with a hand-written PyTorch loop.

    python examples/plain_pytorch.py --steps 100            # builds the demo cache first
    python examples/plain_pytorch.py --cache my-cache/ --temperature 2.0 --alpha 0.5

The loss is ``softcache.kernels.hf.causal_lm_sparse_kl_loss``: fused with the student's output layer, so the
(B, T, V) logits are never made; it shifts the HF-style labels itself, and ``vocab_size=dataset.vocab_size`` leaves
out the logits of a student padded beyond the cache's vocabulary.
"""

import itertools

import torch
from common import demo_cache, parse_args, tiny_student
from softcache.kernels.hf import causal_lm_sparse_kl_loss
from torch.utils.data import DataLoader

import softcache


def main():
    args = parse_args(__doc__.splitlines()[0])
    torch.manual_seed(0)
    dataset = softcache.SoftTargetDataset(demo_cache(args), temperature=args.temperature, max_length=args.max_length)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    student = tiny_student(dataset.vocab_size, args).to(device)
    dataset.check_student(student)  # raises if the student's vocabulary cannot score the cache's ids (pass tokenizer=
    # too, to check it is the teacher's); a student padded larger is scored over the cache's vocab_size (below)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, collate_fn=softcache.collate)
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr)
    for step, batch in zip(range(1, args.steps + 1), itertools.cycle(loader), strict=False):
        batch = {key: value.to(device) for key, value in batch.items()}
        loss = causal_lm_sparse_kl_loss(
            student, batch["input_ids"], batch["target_ids"], batch["target_logprobs"],
            attention_mask=batch["attention_mask"], labels=batch["labels"],
            temperature=dataset.temperature, alpha=args.alpha, vocab_size=dataset.vocab_size,
        )  # fmt: skip
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step == 1 or step % 10 == 0 or step == args.steps:
            print(f"step {step} loss {loss.item():.4f}", flush=True)


if __name__ == "__main__":
    main()
