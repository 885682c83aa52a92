"""``softcache verify``: every shard present, of the recorded size and SHA-256, every batch's CRC, and every batch
decoding to the counts the manifest records; and the files the manifest records beside the shards (``softcache
generate``'s ``generations.jsonl``) present, regular files and of the recorded SHA-256."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import CorruptShardError
from ..format import join, shard_digest
from ..reader import Cache
from .info import completeness
from .recorded import check_recorded_files


@dataclass
class VerifyReport:
    shards_checked: int = 0
    batches_checked: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)
    """(shard, what is wrong with it) for each damaged shard."""
    complete: str = "yes"
    """:func:`softcache.ops.completeness`: "yes…", or "no (interrupted build; …)" for a build that did not finish."""
    files_checked: int = 0
    """Files beside the shards that the manifest records (``generations.jsonl``), sound or not."""
    file_problems: list[tuple[str, str]] = field(default_factory=list)
    """(file, what is wrong and the fix) for each recorded file that is missing, edited or replaced (e.g. by a
    symlink): not a damaged shard, but the cache is not as its manifest says."""

    @property
    def ok(self) -> bool:
        return not self.problems and not self.file_problems


def verify(path_or_url, storage_options: dict | None = None, decode: bool = True, progress=None) -> VerifyReport:
    """Check every shard: present, size and SHA-256 as in the manifest, every batch's CRC, and (with
    ``decode``) that every batch decodes to the counts the manifest records. Problems are collected,
    each naming its shard; the manifest itself must load (else :class:`CacheFormatError`). The files the manifest
    records beside the shards are checked too (:func:`~softcache.ops.recorded.check_recorded_files`, decoding or
    not), their problems in ``report.file_problems``. ``progress(i, name)`` is called before each shard, then each
    recorded file. ``report.complete`` says whether the build that wrote the cache finished (an interrupted one is not
    a problem of the shards)."""
    cache = Cache(path_or_url, storage_options=storage_options, max_cached_batches=1)
    fs, root = cache.fs, cache.root
    report = VerifyReport(complete=completeness(cache.manifest))
    for s, entry in enumerate(cache.manifest.shards):
        name = entry.file
        report.shards_checked += 1
        if progress is not None:
            progress(s, name)
        path = join(root, name)
        if not fs.exists(path):
            report.problems.append((name, "missing"))
            continue
        try:
            cache.shard(s)  # regular files only, of the recorded size, header settings as in the manifest
        except CorruptShardError as e:
            report.problems.append((name, str(e)))
            continue
        size, digest = shard_digest(fs, path)
        if size != entry.bytes or digest != entry.sha256:
            report.problems.append((name, f"checksum mismatch ({size} bytes, manifest says {entry.bytes})"))
            continue
        try:
            tokens = 0
            for b in range(len(entry.batches)):
                if decode:
                    tokens += len(cache.decoded_batch(s, b)["input_ids"])
                else:
                    cache.shard(s).read_batch(b)
                report.batches_checked += 1
            if decode and tokens != entry.tokens:
                report.problems.append((name, f"holds {tokens} tokens, the manifest says {entry.tokens}"))
        except (CorruptShardError, ValueError, IndexError) as e:
            report.problems.append((name, str(e)))
    step = None if progress is None else (lambda i, name: progress(report.shards_checked + i, name))
    sound, report.file_problems = check_recorded_files(cache, progress=step)
    report.files_checked = len(sound) + len(report.file_problems)
    cache.close()
    return report
