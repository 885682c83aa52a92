"""GGUF teachers: a llama.cpp ``.gguf`` file, or a folder holding exactly one and no Hugging Face weights.

The model and its tokenizer load through transformers' GGUF support (``from_pretrained(folder, gguf_file=name)``),
de-quantised to the build dtype, so the teacher pass runs on plain dense weights. :func:`describe` reads what the
manifest records: the file name, its SHA-256 (streamed in chunks) and its quantisation type from the GGUF header.
Reading GGUF needs the optional ``gguf`` package (``pip install 'softcache[gguf]'``).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from collections import Counter

import torch

from ..errors import TeacherError

GGUF_MIN_VERSION = "0.10"  # what transformers' GGUF loader asks for
_HF_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt")
_CHUNK = 1 << 24


def find_gguf(path: str) -> str | None:
    """The ``.gguf`` file that ``--teacher path`` names, or None when ``path`` is not a GGUF teacher.

    A folder is a GGUF teacher when it holds ``.gguf`` files and no Hugging Face weights; it must hold exactly one.
    """
    if path.lower().endswith(".gguf") and not os.path.isdir(path):
        if not os.path.isfile(path):
            raise TeacherError(f"--teacher {path}: no such GGUF file")
        return path
    if not os.path.isdir(path):
        return None
    files = sorted(n for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)))
    ggufs = [n for n in files if n.lower().endswith(".gguf")]
    if not ggufs or any(n.lower().endswith(_HF_WEIGHTS) for n in files):
        return None
    if len(ggufs) > 1:
        raise TeacherError(
            f"--teacher {path} holds {len(ggufs)} GGUF files ({', '.join(ggufs)}); pass the one to use, "
            f"e.g. --teacher {os.path.join(path, ggufs[0])}"
        )
    return os.path.join(path, ggufs[0])


def _require_gguf(file: str) -> None:
    from importlib import metadata

    from packaging.version import Version

    try:
        version = metadata.version("gguf")
    except metadata.PackageNotFoundError:
        version = None
    if version is None or Version(version) < Version(GGUF_MIN_VERSION):
        found = "is not installed" if version is None else f"{version} is installed"
        raise TeacherError(
            f"--teacher {file} is a GGUF file; reading it needs the gguf package >= {GGUF_MIN_VERSION} ({found}): "
            "pip install 'softcache[gguf]'"
        )


def sha256_file(file: str, chunk: int = _CHUNK) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def describe(file: str) -> dict:
    """→ ``{"file", "sha256", "quantization", "tensor_types"}`` of a GGUF file (the header is checked on the way).

    ``quantization`` is the file type the header states (``general.file_type``: "Q4_1", "Q4_K_M", "F16", …), or,
    when it states none, the commonest type of the matrices. ``tensor_types`` counts the tensors of each type.
    """
    _require_gguf(file)
    st = os.stat(file)
    return dict(_describe(os.path.abspath(file), st.st_size, st.st_mtime_ns))


@functools.lru_cache(maxsize=4)  # load and the manifest both ask; the header and the hash are read once
def _describe(file: str, size: int, mtime_ns: int) -> tuple:
    import gguf

    try:
        file_type, types, matrices = _read_header(file)
    except Exception as e:  # a corrupt or truncated file fails in many ways; all of them mean the same here
        raise TeacherError(
            f"--teacher {file}: not a readable GGUF file ({type(e).__name__}: {e}); check the download or "
            "re-export it"
        ) from None
    if not types:
        raise TeacherError(f"--teacher {file}: the GGUF file holds no tensors")
    quant = None
    if file_type is not None:
        try:
            quant = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            quant = None
    if quant is None or quant == "GUESSED":
        quant = (matrices or types).most_common(1)[0][0]
    info = {"file": os.path.basename(file), "sha256": sha256_file(file), "quantization": quant,
            "tensor_types": dict(sorted(types.items()))}
    return tuple(info.items())


def _read_header(file: str) -> tuple[int | None, Counter, Counter]:
    """→ (``general.file_type`` or None, tensors per type name, matrices per type name) from the GGUF header.

    A direct scan with the gguf package's constants: ``gguf.GGUFReader`` parses every element of the vocabulary
    arrays into numpy views, seconds for a 50k vocabulary. Checks the file is long enough for every tensor it lists.
    """
    import mmap
    import struct

    import gguf

    vt = gguf.GGUFValueType
    scalars = {vt.UINT8: "B", vt.INT8: "b", vt.UINT16: "H", vt.INT16: "h", vt.UINT32: "I", vt.INT32: "i",
               vt.FLOAT32: "f", vt.BOOL: "?", vt.UINT64: "Q", vt.INT64: "q", vt.FLOAT64: "d"}
    with open(file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        size, pos = len(buf), 0

        def take(code: str):
            nonlocal pos
            (value,) = struct.unpack_from(order + code, buf, pos)
            pos += struct.calcsize(code)
            return value

        def skip(n: int) -> None:
            nonlocal pos
            if n > size - pos:
                raise ValueError(f"the header runs past the end of the file ({size:,} bytes)")
            pos += n

        def value(kind: int):
            if kind in scalars:
                return take(scalars[kind])
            if kind == vt.STRING:
                return skip(take("Q"))
            if kind != vt.ARRAY:
                raise ValueError(f"unknown metadata value type {kind}")
            item, count = take("I"), take("Q")
            if item in scalars:
                return skip(count * struct.calcsize(scalars[item]))
            if count > size - pos:
                raise ValueError(f"an array of {count:,} items runs past the end of the file")
            for _ in range(count):
                value(item)

        order = "<"
        if take("I") != gguf.GGUF_MAGIC:
            raise ValueError("no GGUF magic number at the start")
        version = take("I")
        if version & 0xFFFF == 0:  # written on a big-endian machine
            order, version = ">", struct.unpack_from(">I", buf, 4)[0]
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version}; only versions 2 and 3 are known")
        tensor_count, kv_count = take("Q"), take("Q")
        if tensor_count > size or kv_count > size:
            raise ValueError(f"{tensor_count:,} tensors and {kv_count:,} metadata keys cannot fit in {size:,} bytes")
        wanted = {b"general.file_type": None, b"general.alignment": gguf.GGUF_DEFAULT_ALIGNMENT}
        for _ in range(kv_count):
            n = take("Q")
            key = bytes(buf[pos : pos + n])
            skip(n)
            v = value(take("I"))
            if key in wanted:
                wanted[key] = v
        types, matrices, need = Counter(), Counter(), 0
        for _ in range(tensor_count):
            skip(take("Q"))  # the tensor's name
            dims = [take("Q") for _ in range(take("I"))]
            kind, offset = gguf.GGMLQuantizationType(take("I")), take("Q")
            block, block_bytes = gguf.GGML_QUANT_SIZES[kind]
            need = max(need, offset + math.prod(dims) // block * block_bytes)
            types[kind.name] += 1
            if len(dims) >= 2 and dims[1] > 1:
                matrices[kind.name] += 1
        align = wanted[b"general.alignment"]
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise ValueError(f"general.alignment {align!r} is not a power of two")
        start = -(-pos // align) * align
        if start + need > size:
            raise ValueError(f"truncated: its tensors need {start + need:,} bytes, the file holds {size:,}")
    return wanted[b"general.file_type"], types, matrices


def teacher_info(path: str) -> dict | None:
    """:func:`describe` of the GGUF file ``--teacher path`` names, or None for a Hugging Face teacher."""
    file = find_gguf(path)
    return None if file is None else describe(file)


def load_gguf(file: str, dtype: torch.dtype, device: str):
    """→ (model, tokenizer) from a GGUF file, de-quantised to ``dtype``; ``device == "map"`` as in load_teacher."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    describe(file)  # a clear error for a missing gguf package or a corrupt file, before transformers tries
    folder, name = os.path.split(os.path.abspath(file))
    kwargs = {"gguf_file": name}
    try:  # transformers that can keep GGUF blocks packed: ask for plain dense weights (older ones always unpack)
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except (ImportError, TypeError):
        pass
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        if device == "map":
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map="auto", **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs).to(device)
    except Exception as e:  # unsupported architecture or tokenizer, damaged tensors: name the file either way
        raise TeacherError(
            f"--teacher {file}: transformers cannot load this GGUF file as a causal LM and its tokenizer "
            f"({type(e).__name__}: {e}); see transformers' GGUF documentation for the architectures it supports"
        ) from None
    return model, tokenizer
