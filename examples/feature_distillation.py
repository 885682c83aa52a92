"""TinyBERT-style feature distillation from a cache: the teacher's hidden states and attention maps, stored once by
``softcache build --hidden-states ... --attentions ...``, are matched layer to layer (g(m) = m · teacher / student
layers) beside the KD loss, with a learned projection from the student's width to the teacher's.

    python examples/feature_distillation.py --steps 100       # builds the demo teacher's feature cache first

The student needs the teacher's number of attention heads (as TinyBERT's attention loss does) and eager attention
(the fused kernels return no attention maps).
"""

import tempfile

import torch
import transformers
from common import parse_args
from softcache.kernels import uniform_layer_map

import softcache
from softcache.demo import teacher_path
from softcache.integrations.hf import DistillationTrainer


def feature_cache(args) -> str:
    """``args.cache`` when it holds hidden states, else the demo teacher's cache with them, built here."""
    if args.cache and "hidden_states" in softcache.open_cache(args.cache).manifest.extras:
        return args.cache
    from softcache.build import build_demo

    out = tempfile.mkdtemp(prefix="softcache-features-") + "/cache"
    print(f"building the demo teacher's feature cache into {out} ...", flush=True)
    build_demo(out, quiet=True, limit=args.demo_limit, max_length=min(args.max_length, 512),
               hidden_states=[0, 1, 2, 3], attentions=[0, 1, 2])  # fmt: skip
    return out


def main():
    args = parse_args(__doc__.splitlines()[0])
    torch.manual_seed(0)
    dataset = softcache.SoftTargetDataset(feature_cache(args), max_length=args.max_length)
    teacher = transformers.AutoConfig.from_pretrained(teacher_path())
    heads = teacher.num_attention_heads
    config = transformers.LlamaConfig.from_pretrained(teacher_path())
    config.update(dict(vocab_size=dataset.vocab_size, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                       num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
                       head_dim=args.hidden // heads))  # fmt: skip
    student = transformers.LlamaForCausalLM(config)
    student.set_attn_implementation("eager")
    layer_map = uniform_layer_map(args.layers, teacher.num_hidden_layers)
    training = transformers.TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="softcache-features-"), max_steps=args.steps,
        per_device_train_batch_size=args.batch_size, learning_rate=args.lr, lr_scheduler_type="constant",
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
    )  # fmt: skip
    trainer = DistillationTrainer(
        # attention probabilities differ by ~1e-3 per entry: their MSE gets a large weight
        model=student, args=training, train_dataset=dataset, alpha=args.alpha, alpha_hidden=1.0, alpha_attention=100.0,
        layer_map=layer_map, projection=torch.nn.Linear(args.hidden, teacher.hidden_size, bias=False),
    )  # fmt: skip
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "hidden_loss" in entry]
    first, last = logs[0], logs[-1]
    print(f"layer map (student: teacher): {layer_map}")
    print(f"after {args.steps} steps: loss {first['loss']:.4f} → {last['loss']:.4f}, hidden "
          f"{first['hidden_loss']:.4f} → {last['hidden_loss']:.4f}, attention "
          f"{first['attention_loss']:.5f} → {last['attention_loss']:.5f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
