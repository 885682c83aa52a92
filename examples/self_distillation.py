"""Self-distillation: a student's own earlier checkpoint as its teacher, offline (a cache) or online (live).

    python examples/self_distillation.py --steps 100          # builds the demo cache first

1. Generation 1: a tiny student distilled from the demo teacher's cache (``--cache``) for ``--steps`` steps, then saved
   with ``save_pretrained`` (and the demo tokenizer): the earlier checkpoint.
2. ``softcache.build.build`` with that checkpoint as the teacher, over the demo corpus: a cache of its own targets.
3. Generation 2 ("born again"): a fresh student of the same shape trained from that cache, and the same fresh student
   trained online, ``DistillationTrainer(teacher=checkpoint)``, on the same batches. The two runs compute the same
   loss step for step, up to the cache's quantisation: switching between offline and online changes nothing else.
"""

import tempfile

import torch
import transformers
from common import demo_cache, parse_args, tiny_student

import softcache
from softcache.build import build
from softcache.demo import corpus_path, teacher_path
from softcache.integrations.hf import DistillationTrainer


def train(student, dataset, args, **options) -> list[float]:
    """``args.steps`` steps of DistillationTrainer; → the loss of each step."""
    training = transformers.TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="softcache-self-"), max_steps=args.steps, seed=0,
        per_device_train_batch_size=args.batch_size, learning_rate=args.lr, lr_scheduler_type="constant",
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
    )  # fmt: skip
    trainer = DistillationTrainer(model=student, args=training, train_dataset=dataset, alpha=args.alpha, **options)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def main():
    args = parse_args(__doc__.splitlines()[0])
    torch.manual_seed(0)
    teacher_cache = softcache.SoftTargetDataset(demo_cache(args), temperature=args.temperature,
                                                max_length=args.max_length)  # fmt: skip

    # 1. the earlier checkpoint
    student = tiny_student(teacher_cache.vocab_size, args)
    losses = train(student, teacher_cache, args)
    checkpoint = tempfile.mkdtemp(prefix="softcache-checkpoint-")
    student.save_pretrained(checkpoint)
    transformers.AutoTokenizer.from_pretrained(teacher_path()).save_pretrained(checkpoint)
    print(f"generation 1: distilled from the demo teacher, loss {losses[0]:.4f} -> {losses[-1]:.4f}", flush=True)

    # 2. its own targets, over the same corpus
    out = tempfile.mkdtemp(prefix="softcache-self-") + "/cache"
    temperatures = sorted({1.0, args.temperature})
    result = build(checkpoint, str(corpus_path("validation")), out, k=32, temperatures=temperatures,
                   max_length=args.max_length, limit=args.demo_limit, quiet=True)  # fmt: skip
    print(result.summary(), flush=True)

    # 3. a fresh student from it, offline and online
    own = softcache.SoftTargetDataset(out, temperature=args.temperature)
    torch.manual_seed(1)
    fresh = tiny_student(own.vocab_size, args).state_dict()
    offline_student, online_student = (tiny_student(own.vocab_size, args) for _ in range(2))
    offline_student.load_state_dict(fresh)
    online_student.load_state_dict(fresh)
    offline = train(offline_student, own, args)
    earlier = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
    tokens = [{"input_ids": own[i]["input_ids"]} for i in range(len(own))]  # the same sequences, without targets
    online = train(online_student, tokens, args, teacher=earlier, teacher_k=32, temperature=args.temperature)
    for step, (a, b) in enumerate(zip(offline, online, strict=True), 1):
        print(f"generation 2, step {step}: loss {a:.4f} offline, {b:.4f} online", flush=True)
    gap = max(abs(a - b) for a, b in zip(offline, online, strict=True))
    print(f"self-distillation: offline and online losses differ by at most {gap:.4f} over {args.steps} steps "
          f"(the cache's log-probs are within {1 / 64 / args.temperature:.4f} nats)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
