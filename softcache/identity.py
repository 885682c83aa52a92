"""Fingerprints that identify a teacher and its tokenizer in a manifest, and let a student be checked against it."""

from __future__ import annotations

import hashlib
import json


def config_hash(config) -> str:
    """SHA-256 of a model config (a ``transformers`` config), without the fields that name where it was loaded."""
    d = {k: v for k, v in config.to_dict().items() if k not in ("_name_or_path", "transformers_version", "dtype")}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def vocab_fingerprint(tokenizer) -> str:
    """SHA-256 of the tokenizer's vocabulary (token → id, added tokens included)."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()
