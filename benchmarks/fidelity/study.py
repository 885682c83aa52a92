"""The fidelity study's parts: caches and held-out text, identical students, their losses, training and metrics.

Every student has the same architecture; within a seed every run starts from the same weights and sees the same
sequences in the same order (input ids read back from the reference cache). Runs differ only in the training loss:

* ``ce``: cross-entropy against the next token (hard labels);
* ``dense``: KL(teacher ‖ student) over the full vocabulary from the live teacher's logits (T = 1);
* ``<cache>_<tail>``: ``softcache.kernels.sparse_kl_loss`` against that cache's targets (T = 1).

KD runs are pure KD (``Setup.alpha`` = 1, no hard-label term) by default, as in Anshumann et al. 2025; with
alpha < 1 each is ``(1 − alpha)·CE + alpha·KD`` over the positions that have a next token (a run may set its own
alpha). The teacher is the demo teacher, or (``sharpened_teacher``) the demo teacher with its logits divided by a
temperature below 1, over the demo corpus; or any Llama teacher over any ``Corpus`` (real.py: SmolLM2-135M).
Everything runs on ``Setup.device`` (CPU by default).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from softcache.kernels import sparse_kl_loss
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from softcache import demo


def student_config(hidden: int = 64, layers: int = 2) -> dict:
    """A Llama student's sizes: MLP ≈ 8/3 of the width (rounded up to a multiple of 4), heads of 16 dims. The
    default is the demo study's student: 2 layers of width 64 (0.36M parameters with the demo vocabulary, 0.26M of
    them the tied embedding)."""
    heads = max(1, hidden // 16)
    return dict(
        hidden_size=hidden,
        intermediate_size=math.ceil(hidden * 8 / 3 / 4) * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
    )


@dataclass(frozen=True)
class Corpus:
    """Text to cache and to evaluate on: a train and a validation file (anything ``softcache build`` reads; column
    ``text``) and the folder of the tokenizer that tokenises them (the teacher's)."""

    train: str
    validation: str
    tokenizer: str

    @classmethod
    def demo(cls) -> Corpus:
        return cls(str(demo.corpus_path("train")), str(demo.corpus_path("validation")), str(demo.teacher_path()))


@dataclass(frozen=True)
class CacheSpec:
    """One cache to build: ``topk`` with ``k`` ids, or ``sampled`` with ``samples`` draws (stored in k = samples)."""

    name: str
    targets: str
    k: int
    samples: int | None = None


@dataclass(frozen=True)
class Run:
    """One training run: its loss (``ce``, ``dense`` or ``cache``), for ``cache`` which cache and tail, and its own
    KD mix ``alpha`` (None: the setup's)."""

    name: str
    loss: str
    cache: str | None = None
    tail: str | None = None
    alpha: float | None = None

    def mix(self, setup: Setup) -> float:
        return setup.alpha if self.alpha is None else self.alpha


@dataclass(frozen=True)
class Setup:
    """Sizes shared by every run."""

    steps: int
    batch: int
    seq_len: int
    lr: float
    eval_seqs: int
    angle_seqs: int = 16
    warmup_frac: float = 0.1
    alpha: float = 1.0
    hidden: int = 64
    layers: int = 2
    device: str = "cpu"


def sharpened_teacher(workdir: str, temperature: float) -> str:
    """A model folder whose logits are the demo teacher's divided by ``temperature`` (the demo teacher's own folder
    for 1): the same weights, with the tied output layer untied and scaled by 1 / ``temperature``."""
    import shutil
    from pathlib import Path

    source = demo.teacher_path()
    if temperature == 1.0:
        return str(source)
    if not 0 < temperature:
        raise ValueError(f"--teacher-temperature must be > 0, got {temperature}")
    out = Path(workdir) / f"teacher-t{temperature:g}"
    if (out / "model.safetensors").exists():
        return str(out)
    teacher = load_teacher()
    config = copy.deepcopy(teacher.config)
    config.tie_word_embeddings = False
    state = {name: value.clone() for name, value in teacher.state_dict().items()}
    state["lm_head.weight"] = state["model.embed_tokens.weight"] / temperature
    sharp = LlamaForCausalLM(config)
    sharp.load_state_dict(state)
    sharp.save_pretrained(str(out))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, out / name)
    return str(out)


def build_caches(
    specs: list[CacheSpec],
    workdir: str,
    seq_len: int,
    n_seqs: int,
    teacher_dir: str,
    corpus: Corpus | None = None,
    dtype: str | None = None,
    device: str | None = None,
) -> dict[str, float | None]:
    """Build each cache from the teacher in ``teacher_dir`` (in ``dtype`` on ``device``: ``softcache build``'s
    defaults when None) over the first documents of the train split of ``corpus`` (default: the demo corpus) that
    fill ``n_seqs`` packed sequences.

    A cache already complete in ``workdir`` with the same build is reused (``softcache.build.build`` is
    resumable and refuses a different build). Returns the seconds each build took (None: reused).
    """
    from softcache.build import build

    corpus = corpus or Corpus.demo()
    limit = docs_needed(n_seqs, seq_len, corpus)
    seconds = {}
    for spec in specs:
        t0 = time.perf_counter()
        result = build(
            teacher_dir,
            corpus.train,
            f"{workdir}/{spec.name}",
            k=spec.k,
            targets=spec.targets,
            samples=spec.samples,
            temperatures=(1.0,),
            max_length=seq_len,
            pack=True,
            limit=limit,
            dtype=dtype,
            device=device,
            quiet=True,
        )
        seconds[spec.name] = None if result.already_complete else time.perf_counter() - t0
        state = "reused" if result.already_complete else f"built in {seconds[spec.name]:.0f}s"
        print(f"cache {spec.name}: {result.sequences} sequences, {result.tokens} tokens, {state}", flush=True)
    return seconds


def _packed_docs(corpus: Corpus, split: str, min_tokens: float = math.inf) -> list[np.ndarray]:
    """The first documents of ``corpus``'s ``split`` (``train`` or ``validation``), tokenised as ``softcache build``
    does and each followed by EOS, until they hold ``min_tokens`` tokens (all of them by default)."""
    import pyarrow.parquet as pq

    tokenizer = AutoTokenizer.from_pretrained(corpus.tokenizer)
    texts = pq.read_table(getattr(corpus, split), columns=["text"]).column("text").to_pylist()
    docs, tokens = [], 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"] if text else []
        docs.append(np.asarray(ids + [tokenizer.eos_token_id], np.int64) if ids else np.zeros(0, np.int64))
        tokens += len(docs[-1])
        if tokens >= min_tokens:
            break
    return docs


def docs_needed(n_seqs: int, seq_len: int, corpus: Corpus | None = None) -> int:
    """The fewest train documents (dataset rows, empty ones included) whose packed tokens fill ``n_seqs`` sequences
    of ``seq_len``."""
    need = n_seqs * seq_len
    docs = _packed_docs(corpus or Corpus.demo(), "train", need)
    tokens = sum(len(d) for d in docs)
    if tokens < need:
        raise ValueError(
            f"the train split has {tokens} tokens, fewer than the {need} asked for; lower --steps, --batch or --seq-len"
        )
    return len(docs)


@dataclass
class HeldOut:
    """Held-out sequences (n, L) and the teacher's next-token probabilities at every position but the last, per
    evaluation batch (computed once: the teacher is fixed), with Σ p·log p over all of them."""

    ids: torch.Tensor
    teacher_probs: list[torch.Tensor]
    teacher_plogp: float
    batch: int


@torch.no_grad()
def held_out(n_seqs: int, seq_len: int, teacher, batch: int = 32, corpus: Corpus | None = None) -> HeldOut:
    """The first ``n_seqs`` full packed sequences of the validation split of ``corpus`` (default: the demo corpus)
    and the teacher's view of them, on the teacher's device."""
    stream = np.concatenate(_packed_docs(corpus or Corpus.demo(), "validation", n_seqs * seq_len))
    n = min(n_seqs, len(stream) // seq_len)
    ids = torch.from_numpy(stream[: n * seq_len].reshape(n, seq_len)).to(teacher.device)
    probs, plogp = [], 0.0
    for a in range(0, n, batch):
        log_p = F.log_softmax(teacher(input_ids=ids[a : a + batch]).logits[:, :-1].float(), -1)
        probs.append(log_p.exp())
        plogp += float((probs[-1] * log_p).sum())
    return HeldOut(ids, probs, plogp, batch)


def teacher_metrics(held: HeldOut, top: int = 64) -> dict[str, float]:
    """The teacher's own held-out CE and ECE (as ``evaluate`` measures a student) and the mean probability its
    ``top`` most likely ids hold."""
    ce_sum, mass = 0.0, 0.0
    confidence, correct = [], []
    for ids, p in zip(held.ids.split(held.batch), held.teacher_probs, strict=True):
        labels = ids[:, 1:]
        ce_sum += float(-p.gather(-1, labels[..., None]).clamp_min(1e-30).log().sum())
        mass += float(p.topk(top, -1).values.sum())
        top_p, top_id = p.max(-1)
        confidence.append(top_p.flatten().cpu().numpy())
        correct.append((top_id == labels).flatten().cpu().numpy())
    n = held.ids[:, 1:].numel()
    calibration = ece(np.concatenate(confidence), np.concatenate(correct))
    return {"ce": ce_sum / n, "ece": calibration, f"top{top}_mass": mass / n}


def load_targets(cache, seqs: np.ndarray, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Target ids (int32) and T=1 log-probs of sequences ``seqs``, checked to hold ``input_ids``; slots that are
    padding in every row are dropped."""
    ids, logprobs = [], []
    for row, i in enumerate(seqs):
        rec = cache[int(i)]
        if not np.array_equal(rec["input_ids"], input_ids[row].numpy()):
            raise ValueError(f"{cache.url}: sequence {i} holds other tokens than the reference cache; rebuild it")
        t_ids, t_lp = cache.targets(int(i), 1.0)
        ids.append(t_ids)
        logprobs.append(t_lp)
    ids, logprobs = np.stack(ids), np.stack(logprobs)
    used = (ids >= 0).any(axis=(0, 1))  # such slots change no loss term and only cost memory
    return torch.from_numpy(ids[..., used]), torch.from_numpy(logprobs[..., used])


def cache_stats(cache, n_seqs: int, every: int = 10) -> dict[str, float | None]:
    """Bytes/token of the whole cache; mean stored ids per position and (top-k only) mean teacher mass in them, over
    every ``every``-th of its first ``n_seqs`` sequences. Sampled caches store counts, whose mass is 1 by design."""
    ids, mass = [], []
    for i in range(0, n_seqs, every):
        t_ids, t_lp = cache.targets(i, 1.0)
        ids.append((t_ids >= 0).sum(1))
        mass.append(np.where(t_ids >= 0, np.exp(t_lp.astype(np.float64)), 0.0).sum(1))
    return {
        "bytes_per_token": cache.num_bytes / cache.num_tokens,
        "ids_per_position": float(np.concatenate(ids).mean()),
        "teacher_mass": float(np.concatenate(mass).mean()) if cache.targets_kind == "topk" else None,
    }


def load_teacher(path: str | None = None, dtype: str | None = None, device: str = "cpu") -> LlamaForCausalLM:
    """The model in ``path`` (default: the demo teacher), in ``dtype`` (default float32) on ``device``, in eval
    mode."""
    model = LlamaForCausalLM.from_pretrained(path or str(demo.teacher_path()), dtype=getattr(torch, dtype or "float32"))
    return model.to(device).eval()


def make_student(
    vocab_size: int, seq_len: int, seed: int, hidden: int = 64, layers: int = 2, device: str = "cpu"
) -> LlamaForCausalLM:
    """The seed's initial student (``student_config(hidden, layers)``, tied embedding), float32 on ``device``."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=seq_len,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        **student_config(hidden, layers),
    )
    return LlamaForCausalLM(config).to(device)


def dense_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(p ‖ q), full vocabulary, T = 1."""
    log_p = F.log_softmax(teacher_logits.float(), -1).flatten(0, -2)
    log_q = F.log_softmax(student_logits.float(), -1).flatten(0, -2)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


def next_token_ce(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())


def run_loss(run: Run, student, input_ids, teacher=None, targets=None, alpha: float = 1.0) -> torch.Tensor:
    """The training loss of ``run`` on one batch; soft targets at position t are for the token at t+1 (no shift).

    With ``alpha`` < 1 a KD run's loss is ``(1 − alpha)·CE + alpha·KD``, both over every position but the last
    (which has no next token); with alpha = 1 the KD term covers every position."""
    logits = student(input_ids=input_ids).logits
    if run.loss == "ce":
        return next_token_ce(logits, input_ids)
    if run.loss == "dense":
        with torch.no_grad():
            teacher_logits = teacher(input_ids=input_ids).logits
        if alpha == 1.0:
            return dense_kl(logits, teacher_logits)
        kd = dense_kl(logits[:, :-1], teacher_logits[:, :-1])
        return (1 - alpha) * next_token_ce(logits, input_ids) + alpha * kd
    target_ids, target_logprobs = targets
    options = {} if alpha == 1.0 else dict(labels=F.pad(input_ids[:, 1:], (0, 1), value=-100), alpha=alpha)
    return sparse_kl_loss(logits, target_ids.long(), target_logprobs, tail=run.tail, temperature=1.0, **options)


def lr_at(step: int, setup: Setup) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    warmup = max(1, int(setup.warmup_frac * setup.steps))
    if step < warmup:
        return setup.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, setup.steps - warmup)
    return setup.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(run: Run, student, order: np.ndarray, input_ids, setup: Setup, teacher=None, targets=None):
    """``setup.steps`` AdamW steps; batch ``s`` is the sequences ``order[s*batch:(s+1)*batch]``."""
    opt = torch.optim.AdamW(student.parameters(), lr=setup.lr, betas=(0.9, 0.95), weight_decay=0.01)
    student.train()
    for step in range(setup.steps):
        rows = torch.from_numpy(order[step * setup.batch : (step + 1) * setup.batch]).to(input_ids.device)
        batch_targets = None if targets is None else (targets[0][rows], targets[1][rows])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, setup)
        loss = run_loss(run, student, input_ids[rows], teacher, batch_targets, run.mix(setup))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
    student.eval()
    return student


def ece(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error: Σ_b (n_b / n)·|accuracy_b − mean confidence_b| over equal-width bins of (0, 1]."""
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    conf = np.bincount(which, weights=confidence, minlength=bins)
    acc = np.bincount(which, weights=correct.astype(np.float64), minlength=bins)
    return float(np.abs(acc - conf).sum() / len(confidence))


@torch.no_grad()
def evaluate(student, held: HeldOut) -> dict[str, float]:
    """Held-out CE (nats/token, against the true next tokens), KL(teacher ‖ student) and ECE (15 bins) at the
    same positions (every position but the last of each sequence)."""
    ce_sum, p_logq = 0.0, 0.0
    confidence, correct = [], []
    for ids, p in zip(held.ids.split(held.batch), held.teacher_probs, strict=True):
        log_q = F.log_softmax(student(input_ids=ids).logits[:, :-1].float(), -1)
        labels = ids[:, 1:]
        ce_sum += float(-log_q.gather(-1, labels[..., None]).sum())
        p_logq += float((p * log_q).sum())
        top_logq, top_id = log_q.max(-1)
        confidence.append(top_logq.exp().flatten().cpu().numpy())
        correct.append((top_id == labels).flatten().cpu().numpy())
    n = held.ids[:, 1:].numel()
    kl = (held.teacher_plogp - p_logq) / n
    return {"ce": ce_sum / n, "kl": kl, "ece": ece(np.concatenate(confidence), np.concatenate(correct))}


def flat_grad(run: Run, student, input_ids, teacher=None, targets=None, alpha: float = 1.0) -> torch.Tensor:
    """The gradient of ``run``'s loss on one batch w.r.t. all student parameters, flattened."""
    student.zero_grad(set_to_none=True)
    run_loss(run, student, input_ids, teacher, targets, alpha).backward()
    grad = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
    student.zero_grad(set_to_none=True)
    return grad


def angle_degrees(a: torch.Tensor, b: torch.Tensor) -> float:
    cos = torch.dot(a.double(), b.double()) / (a.double().norm() * b.double().norm())
    return math.degrees(math.acos(float(cos.clamp(-1.0, 1.0))))
