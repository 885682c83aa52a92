"""The manifest ``softcache.json``: what a cache holds, and the rules that keep reading it safe.

The manifest is the commit point of a cache: a shard exists for readers only once the manifest names
it, and the manifest is replaced atomically (written under a temporary name, then renamed), so a
writer killed at any moment leaves the previous, consistent manifest behind.

In memory it is a :class:`Manifest` with a :class:`ShardEntry` per shard and, for caches written by
``softcache build``, a :class:`BuildState` (whether the build finished, which sequences it skipped). On disk it is
the same JSON as ever (format version 1); caches written before the build state had its own section kept it in
``metadata`` (``complete``, ``skipped_bad``), and are read as if it were in its section.
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass, field

from .. import codec
from .._version import __version__
from ..errors import CacheFormatError
from ..kinds import KINDS, Settings, TargetKind, get_kind
from .fs import join, tmp_name

FORMAT_VERSION = 1
MANIFEST_NAME = "softcache.json"
_SHARD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_REQUIRED = ("format_version", "targets", "k", "vocab_size", "temperatures", "backend", "codec", "shards")
FIXED_KEYS = ("targets", "k", "vocab_size", "temperatures", "samples", "backend", "codec")
"""What a writer appending to a cache must agree on with it."""


def check_shard_name(name: object, where: str = MANIFEST_NAME) -> str:
    """A shard's file name must be a plain name inside the cache: no separators, no ``..``, not absolute."""
    if not isinstance(name, str) or not _SHARD_NAME.fullmatch(name) or ".." in name or posixpath.isabs(name):
        raise CacheFormatError(
            f"{where}: shard file name {name!r} is not a plain file name inside the cache "
            "(no '/', '\\', '..' or absolute paths); the manifest was altered or written by another tool"
        )
    return name


@dataclass
class ShardEntry:
    """One committed shard: its file, what it holds, its size and digest, and sequences per batch."""

    file: str
    sequences: int
    tokens: int
    bytes: int
    batches: list[int]
    entries: int | None = None  # target entries stored; absent in caches from before it was recorded
    sha256: str | None = None

    @classmethod
    def from_dict(cls, d: object, i: int, where: str) -> ShardEntry:
        if not isinstance(d, dict):
            raise CacheFormatError(f"{where}: shard entry {i} is not an object")
        name = check_shard_name(d.get("file"), where)
        for key in ("sequences", "tokens", "bytes", "batches"):
            if key not in d:
                raise CacheFormatError(f"{where}: shard {name} lacks {key!r}")
        entry = cls(name, d["sequences"], d["tokens"], d["bytes"], list(d["batches"]), d.get("entries"),
                    d.get("sha256"))
        if sum(entry.batches) != entry.sequences:
            raise CacheFormatError(f"{where}: shard {name}: batch sizes do not add up to its sequences")
        return entry

    def to_dict(self) -> dict:
        d = {"file": self.file, "sequences": self.sequences, "tokens": self.tokens, "bytes": self.bytes,
             "sha256": self.sha256, "batches": list(self.batches)}
        if self.entries is not None:
            d["entries"] = self.entries
        return d


@dataclass
class BuildState:
    """Progress of ``softcache build`` on this cache: finished or not, and the sequences it skipped
    (``--skip-bad``), in dataset order, up to the last committed shard."""

    complete: bool = False
    skipped_bad: list[int] = field(default_factory=list)


@dataclass
class Manifest:
    """A cache's manifest. ``manifest["key"]`` reads the JSON view, as the dict it replaced did."""

    targets: str
    k: int
    vocab_size: int
    temperatures: list[float]
    samples: int | None
    backend: str
    codec: dict
    metadata: dict = field(default_factory=dict)
    shards: list[ShardEntry] = field(default_factory=list)
    build_state: BuildState | None = None
    format_version: int = FORMAT_VERSION
    softcache_version: str = __version__

    @property
    def kind(self) -> TargetKind:
        return get_kind(self.targets)

    @property
    def settings(self) -> Settings:
        params = codec.CodecParams(**self.codec)
        return Settings(self.k, self.vocab_size, tuple(self.temperatures), self.samples, params)

    @property
    def num_sequences(self) -> int:
        return sum(s.sequences for s in self.shards)

    @property
    def num_tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    @property
    def num_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def fixed(self) -> dict:
        """The settings every writer of this cache must share (:data:`FIXED_KEYS`)."""
        return {key: getattr(self, key) for key in FIXED_KEYS}

    def to_dict(self) -> dict:
        d = {
            "format": "softcache",
            "format_version": self.format_version,
            "softcache_version": self.softcache_version,
            **self.fixed(),
            "metadata": self.metadata,
            "shards": [s.to_dict() for s in self.shards],
        }
        if self.build_state is not None:
            state = self.build_state
            d["build_state"] = {"complete": state.complete, "skipped_bad": list(state.skipped_bad)}
        return d

    def __getitem__(self, key: str):
        return self.to_dict()[key]

    def get(self, key: str, default=None):
        return self.to_dict().get(key, default)

    @classmethod
    def from_dict(cls, d: object, where: str) -> Manifest:
        if not isinstance(d, dict):
            raise CacheFormatError(f"{where}: the manifest must be a JSON object")
        if d.get("format") != "softcache":
            raise CacheFormatError(f"{where}: not a softcache manifest (missing \"format\": \"softcache\")")
        version = d.get("format_version")
        if not isinstance(version, int) or version < 1:
            raise CacheFormatError(f"{where}: invalid format_version {version!r}")
        if version > FORMAT_VERSION:
            raise CacheFormatError(
                f"{where}: format version {version} is newer than this softcache reads ({FORMAT_VERSION}); "
                "upgrade softcache (pip install -U softcache)"
            )
        missing = [key for key in _REQUIRED if key not in d]
        if missing:
            raise CacheFormatError(f"{where}: manifest lacks {', '.join(missing)}")
        if d["targets"] not in KINDS:
            raise CacheFormatError(f"{where}: unknown target kind {d['targets']!r}")
        if not isinstance(d["shards"], list):
            raise CacheFormatError(f"{where}: shards must be a list")
        metadata = dict(d.get("metadata") or {})
        state = d.get("build_state")
        if state is None and "build" in metadata and "complete" in metadata:  # a build before BuildState existed
            state = {"complete": metadata.pop("complete"), "skipped_bad": metadata.pop("skipped_bad", [])}
        return cls(
            targets=d["targets"],
            k=d["k"],
            vocab_size=d["vocab_size"],
            temperatures=list(d["temperatures"]),
            samples=d.get("samples"),
            backend=d["backend"],
            codec=d["codec"],
            metadata=metadata,
            shards=[ShardEntry.from_dict(s, i, where) for i, s in enumerate(d["shards"])],
            build_state=None if state is None else BuildState(bool(state["complete"]), list(state["skipped_bad"])),
            format_version=version,
            softcache_version=d.get("softcache_version", "unknown"),
        )


def load_manifest(fs, root: str) -> Manifest:
    """Read and validate the manifest of the cache at ``root`` on filesystem ``fs``."""
    path = join(root, MANIFEST_NAME)
    if not fs.exists(path):
        what = "does not exist" if not fs.exists(root) else f"has no {MANIFEST_NAME}"
        raise CacheFormatError(f"{root} {what}: not a softcache cache (build one with `softcache build`)")
    try:
        data = json.loads(fs.cat_file(path))
    except (ValueError, UnicodeDecodeError) as e:
        raise CacheFormatError(f"{path}: manifest is not valid JSON ({e})") from None
    return Manifest.from_dict(data, path)


def save_manifest(fs, root: str, manifest: Manifest) -> None:
    """Atomically replace the manifest: write a temporary file, then rename it over the old one."""
    data = manifest.to_dict()
    Manifest.from_dict(data, "manifest to save")  # the same checks as on reading: never save what cannot load
    path = join(root, MANIFEST_NAME)
    tmp = join(root, tmp_name(MANIFEST_NAME))
    with fs.open(tmp, "wb") as f:
        f.write(json.dumps(data, indent=1, sort_keys=True).encode())
    fs.mv(tmp, path)
