"""Start-up checks that a student can train from a cache: vocabulary size and tokenizer."""

from __future__ import annotations

import warnings

from ..identity import vocab_fingerprint


def _student_vocab_size(model, vocab_size: int | None) -> int:
    if vocab_size is not None:
        return int(vocab_size)
    if model is None:
        raise ValueError("check_student needs the student: pass model= or vocab_size=")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if size is None:
        raise ValueError(
            f"cannot tell the vocabulary size of {type(model).__name__}: it has no output embeddings and no "
            "config.vocab_size; pass vocab_size="
        )
    return int(size)


def check_student(cache, model=None, *, vocab_size: int | None = None, tokenizer=None) -> int:
    """Check that a student can learn from ``cache``; return how many extra logits the student has.

    The student's vocabulary size is ``vocab_size`` if given, else the rows of
    ``model.get_output_embeddings().weight``, else ``model.config.vocab_size``. A student with fewer logits
    than the cache's ``vocab_size`` is an error; one padded larger (e.g. to a multiple of 64) is fine: the
    return value is the number of extra logits, which the trainer masks by slicing the logits to the
    cache's ``vocab_size``.

    With ``tokenizer``, its vocabulary fingerprint (``softcache.identity.vocab_fingerprint``) must
    equal the one the cache recorded (``metadata.tokenizer.vocab_sha256``): a different tokenizer maps the
    same ids to different tokens. A cache without a fingerprint only warns.
    """
    student = _student_vocab_size(model, vocab_size)
    if cache.vocab_size > student:
        raise ValueError(
            f"the cache {cache.url} has vocab_size={cache.vocab_size} but the student has {student} logits: "
            f"target ids up to {cache.vocab_size - 1} cannot be scored. Use a student with the teacher's "
            f"tokenizer, or grow its vocabulary (model.resize_token_embeddings({cache.vocab_size}))"
        )
    if tokenizer is not None:
        recorded = (cache.manifest.metadata.get("tokenizer") or {}).get("vocab_sha256")
        if recorded is None:
            warnings.warn(
                f"the cache {cache.url} records no tokenizer fingerprint, so the student's tokenizer cannot be "
                "checked against the teacher's; make sure they are the same",
                stacklevel=2,
            )
        else:
            mine = vocab_fingerprint(tokenizer)
            if mine != recorded:
                name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
                raise ValueError(
                    f"tokenizer mismatch: the cache {cache.url} was built with a tokenizer whose vocabulary "
                    f"fingerprint is {recorded[:16]}…, the student's tokenizer {name!r} has {mine[:16]}…; "
                    "train with the teacher's tokenizer, or rebuild the cache with the student's"
                )
    return student - cache.vocab_size
