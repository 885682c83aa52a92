"""GGUF teachers in the teacher pass: a tiny Llama written as a Q4_1 GGUF file with the gguf package, on CPU."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import softcache
from softcache.build import build
from softcache.errors import TeacherError

gguf = pytest.importorskip("gguf")
QUANT = gguf.GGMLQuantizationType.Q4_1

# transformers' Llama names → llama.cpp's
_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
          "lm_head.weight": "output.weight"}
_LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order of the q/k projections (transformers undoes it on load)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def make_gguf_teacher(path: Path, text: list[str], seed: int = 0):
    """A 2-layer Llama (hidden 32) with a byte-level BPE vocabulary of ~300 tokens, written as a Q4_1 GGUF file
    (matrices Q4_1, norms F32). → (file, float64 reference model whose weights went through Q4_1 and back)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe = json.loads(tok.to_str())["model"]
    tokens = sorted(bpe["vocab"], key=bpe["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    eos = bpe["vocab"]["<|endoftext|>"]

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokens), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, bos_token_id=eos, eos_token_id=eos)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # a peakier distribution than the default init, so that top-k is informative
        model.lm_head.weight.mul_(20)
    rope_theta = getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]

    file = path / "tiny.Q4_1.gguf"
    w = gguf.GGUFWriter(str(file), "llama")
    w.add_name("tiny")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    w.add_context_length(256)
    w.add_embedding_length(32)
    w.add_block_count(2)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_dimension_count(8)
    w.add_rope_freq_base(float(rope_theta))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if i == eos else 1 for i in range(len(tokens))])  # 3: control
    w.add_token_merges(merges)
    w.add_bos_token_id(eos)
    w.add_eos_token_id(eos)

    names = dict(_NAMES)
    for i in range(cfg.num_hidden_layers):
        names.update({f"model.layers.{i}.{hf}.weight": f"blk.{i}.{g}.weight" for hf, g in _LAYER.items()})
    state = model.state_dict()
    dequantised = {}
    for hf, name in names.items():
        a = state[hf].numpy().astype(np.float32)
        if a.ndim == 2:  # Q4_1 rows: a row permutation commutes with the round trip
            packed = gguf.quants.quantize(a, QUANT)
            dequantised[hf] = torch.from_numpy(gguf.quants.dequantize(packed, QUANT).astype(np.float64))
            if ".q_proj" in hf or ".k_proj" in hf:
                heads = 4 if ".q_proj" in hf else 2
                packed = gguf.quants.quantize(_permute(a, heads), QUANT)
            w.add_tensor(name, packed, raw_dtype=QUANT)
        else:
            dequantised[hf] = torch.from_numpy(a.astype(np.float64))
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    model = model.double()
    model.load_state_dict(dequantised)
    return file, model.eval()


@pytest.fixture(scope="module")
def gguf_teacher(tmp_path_factory, text):
    return make_gguf_teacher(tmp_path_factory.mktemp("gguf"), text)


def test_gguf_teacher_stores_the_targets_of_its_dequantised_weights(gguf_teacher, data, tmp_path):
    file, reference = gguf_teacher
    result = build(str(file), str(data), str(tmp_path / "c"), k=8, temperatures=(1.0, 2.0), max_length=40, pack=True,
                   batch_tokens=100, quiet=True)
    cache = softcache.open_cache(tmp_path / "c")
    assert result.sequences == len(cache) > 3
    teacher = cache.manifest["metadata"]["teacher"]
    assert teacher["gguf"]["file"] == "tiny.Q4_1.gguf" and teacher["gguf"]["quantization"] == "Q4_1"
    assert teacher["gguf"]["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
    assert teacher["gguf"]["tensor_types"] == {"F32": 5, "Q4_1": 16} and teacher["dtype"] == "float32"
    step = cache.params.logprob_step
    for i in range(len(cache)):
        ids_in = cache[i]["input_ids"]
        with torch.no_grad():
            z = reference(input_ids=torch.from_numpy(ids_in.astype(np.int64))[None]).logits[0]
        for t in (1.0, 2.0):
            logp = torch.log_softmax(z / t, -1).numpy()
            ids, lp = cache.targets(i, t)
            top = np.argsort(-logp, axis=-1, kind="stable")[:, :8]
            np.testing.assert_array_equal(np.sort(ids, -1), np.sort(top, -1))
            np.testing.assert_allclose(lp, np.take_along_axis(logp, ids, -1), atol=step / t + 1e-5)


def test_a_folder_with_one_gguf_file_is_that_file(gguf_teacher, text, write_jsonl, tmp_path):
    file, _ = gguf_teacher
    docs = write_jsonl(tmp_path / "d.jsonl", text[:3])
    build(str(file.parent), str(docs), str(tmp_path / "c"), k=4, max_length=16, quiet=True)
    meta = softcache.open_cache(tmp_path / "c").manifest["metadata"]
    assert meta["teacher"]["gguf"]["file"] == file.name and meta["build"]["teacher_gguf_sha256"] == \
        meta["teacher"]["gguf"]["sha256"]


def test_gguf_errors_name_the_files_and_the_fix(gguf_teacher, data, tmp_path, monkeypatch):
    file, _ = gguf_teacher
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.Q4_1.gguf", "b.Q8_0.gguf"):
        (two / name).write_bytes(file.read_bytes())
    with pytest.raises(TeacherError, match=r"2 GGUF files \(a\.Q4_1\.gguf, b\.Q8_0\.gguf\); pass the one"):
        build(str(two), str(data), str(tmp_path / "x"), quiet=True)

    blob = file.read_bytes()
    for name, content in (("garbage.gguf", b"not a gguf file at all" * 10), ("truncated.gguf", blob[: len(blob) // 2])):
        bad = tmp_path / name
        bad.write_bytes(content)
        with pytest.raises(TeacherError, match=rf"--teacher {bad}: not a readable GGUF file"):
            build(str(bad), str(data), str(tmp_path / "x"), quiet=True)

    with pytest.raises(TeacherError, match="no such GGUF file"):
        build(str(tmp_path / "missing.gguf"), str(data), str(tmp_path / "x"), quiet=True)

    import importlib.metadata

    version = importlib.metadata.version

    def without_gguf(name):
        if name == "gguf":
            raise importlib.metadata.PackageNotFoundError(name)
        return version(name)

    monkeypatch.setattr(importlib.metadata, "version", without_gguf)
    missing = r"gguf package >= 0\.10 \(is not installed\): pip install 'softcache\[gguf\]'"
    with pytest.raises(TeacherError, match=missing):
        build(str(file), str(data), str(tmp_path / "x"), quiet=True)
