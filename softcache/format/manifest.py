"""The manifest ``softcache.json``: what a cache holds, and the rules that keep reading it safe.

The manifest is the commit point of a cache: a shard exists for readers only once the manifest names
it, and the manifest is replaced atomically (written under a temporary name, then renamed), so a
writer killed at any moment leaves the previous, consistent manifest behind.

Everything that decodes is checked before it is trusted: the manifest carries ``manifest_sha256``, the SHA-256 of its
canonical JSON without that field, so an edited or damaged manifest is refused by name (caches written before it
existed have none, and ``softcache info`` says so); every field is type- and range-checked (:func:`Manifest.from_dict`);
and each shard's header repeats the settings it was encoded with (:meth:`Manifest.shard_settings`), which the reader
compares with the manifest's.

In memory it is a :class:`Manifest` with a :class:`ShardEntry` per shard and, for caches written by
``softcache build``, a :class:`BuildState` (whether the build finished, which sequences it skipped). On disk it is
the same JSON as ever (format version 1); caches written before the build state had its own section kept it in
``metadata`` (``complete``, ``skipped_bad``), and are read as if it were in its section.
"""

from __future__ import annotations

import hashlib
import json
import math
import posixpath
import re
from dataclasses import dataclass, field

from .. import codec
from .._version import __version__
from ..errors import CacheFormatError
from ..extras import EXTRAS, Extra, configure
from ..kinds import KINDS, Settings, TargetKind, get_kind
from .base import BACKENDS
from .fs import check_plain_file, join, tmp_name

FORMAT_VERSION = 2
"""Version 2 caches hold extra per-position streams (``extras``, e.g. a loss mask) that a version-1 reader would
silently ignore; caches without extras are still written as version 1, so older softcache reads them."""
MANIFEST_NAME = "softcache.json"
_SHARD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_REQUIRED = ("format_version", "targets", "k", "vocab_size", "temperatures", "backend", "codec", "shards")
FIXED_KEYS = ("targets", "k", "vocab_size", "temperatures", "samples", "backend", "codec")
"""What a writer appending to a cache must agree on with it."""
CHECKSUM_KEY = "manifest_sha256"
MAX_VOCAB = 1 << 24
"""Largest vocabulary a cache may declare: every shard's id order is O(vocab) memory (262k is the largest LLM's)."""
MAX_K = 1 << 16
"""Most target entries per position: decoding allocates (tokens × k)."""
MAX_COUNT = 1 << 53
"""Counts (tokens, bytes, ...) beyond this are not exact in JSON numbers."""
MAX_MANIFEST_BYTES = 256 << 20
"""A manifest larger than this is refused before it is read (a real one is a few hundred bytes per shard)."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(d: dict, key: str, where: str, low: int = 0, high: int = MAX_COUNT, optional: bool = False) -> int | None:
    """``d[key]`` as an int in [low, high] (not a bool, not a float), or a CacheFormatError naming it."""
    value = d.get(key)
    if value is None and optional:
        return None
    if not _is_int(value) or not low <= value <= high:
        raise CacheFormatError(f"{where}: {key} must be an integer in [{low}, {high}], got {value!r}")
    return value


def canonical_digest(data: dict) -> str:
    """SHA-256 of ``data``'s canonical JSON (sorted keys, no whitespace), without ``manifest_sha256``."""
    body = {key: value for key, value in data.items() if key != CHECKSUM_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


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
        at = f"{where}: shard {name}"
        batches = d["batches"]
        if not isinstance(batches, list) or not all(_is_int(n) and n >= 1 for n in batches):
            raise CacheFormatError(f"{at}: batches must be a list of positive sequence counts")
        sha = d.get("sha256")
        if sha is not None and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
            raise CacheFormatError(f"{at}: sha256 must be 64 hex digits, got {sha!r}")
        entry = cls(name, _int(d, "sequences", at), _int(d, "tokens", at), _int(d, "bytes", at), list(batches),
                    _int(d, "entries", at, optional=True), sha)
        if sum(entry.batches) != entry.sequences:
            raise CacheFormatError(f"{at}: batch sizes do not add up to its sequences")
        if entry.tokens < entry.sequences:
            raise CacheFormatError(f"{at}: {entry.tokens} tokens cannot hold {entry.sequences} sequences")
        return entry

    def to_dict(self) -> dict:
        d = {"file": self.file, "sequences": self.sequences, "tokens": self.tokens, "bytes": self.bytes,
             "sha256": self.sha256, "batches": list(self.batches)}
        if self.entries is not None:
            d["entries"] = self.entries
        return d


@dataclass
class BuildState:
    """Progress of ``softcache build`` (or ``generate``) on this cache: finished or not, the sequences it skipped
    (``--skip-bad``) and the generated samples its ``filter`` rejected, in dataset order, up to the last committed
    shard."""

    complete: bool = False
    skipped_bad: list[int] = field(default_factory=list)
    rejected: list[int] = field(default_factory=list)


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
    extras: dict[str, dict] = field(default_factory=dict)
    """Extra streams beside the targets (see :mod:`softcache.extras`): name → settings."""
    format_version: int = 1
    softcache_version: str = __version__
    checksummed: bool = True
    """False for a manifest written before manifests carried their own checksum (it was not verified)."""

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
        """The settings every writer of this cache must share (:data:`FIXED_KEYS`, and its extras if any)."""
        fixed = {key: getattr(self, key) for key in FIXED_KEYS}
        if self.extras:
            fixed["extras"] = {name: dict(settings) for name, settings in self.extras.items()}
        return fixed

    def configured_extras(self) -> list[Extra]:
        return configure(self.extras)

    def shard_settings(self) -> bytes:
        """What each shard's header repeats (everything that decodes it; not the backend, which convert changes)."""
        fixed = {key: value for key, value in self.fixed().items() if key != "backend"}
        return json.dumps(fixed, sort_keys=True, separators=(",", ":")).encode()

    def to_dict(self) -> dict:
        d = {
            "format": "softcache",
            "format_version": max(self.format_version, 2 if self.extras else 1),
            "softcache_version": self.softcache_version,
            **self.fixed(),
            "metadata": self.metadata,
            "shards": [s.to_dict() for s in self.shards],
        }
        if self.build_state is not None:
            state = self.build_state
            d["build_state"] = {"complete": state.complete, "skipped_bad": list(state.skipped_bad)}
            if state.rejected:  # (a key only when there are some: builds keep the manifests they always wrote)
                d["build_state"]["rejected"] = list(state.rejected)
        d[CHECKSUM_KEY] = canonical_digest(d)
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
        if not _is_int(version) or version < 1:
            raise CacheFormatError(f"{where}: invalid format_version {version!r}")
        if version > FORMAT_VERSION:
            raise CacheFormatError(
                f"{where}: format version {version} is newer than this softcache reads ({FORMAT_VERSION}); "
                "upgrade softcache (pip install -U softcache)"
            )
        missing = [key for key in _REQUIRED if key not in d]
        if missing:
            raise CacheFormatError(f"{where}: manifest lacks {', '.join(missing)}")
        checksum = d.get(CHECKSUM_KEY)
        if checksum is not None and checksum != canonical_digest(d):
            raise CacheFormatError(
                f"{where}: the manifest does not match its checksum ({CHECKSUM_KEY}): it was edited or damaged. "
                "Restore it from a copy, or rebuild the cache; softcache never decodes a cache with an altered manifest"
            )
        fields = _check_fields(d, where)
        metadata = dict(d.get("metadata") or {})
        state = d.get("build_state")
        if state is None and "build" in metadata and "complete" in metadata:  # a build before BuildState existed
            state = {"complete": metadata.pop("complete"), "skipped_bad": metadata.pop("skipped_bad", [])}
        shards = [ShardEntry.from_dict(s, i, where) for i, s in enumerate(d["shards"])]
        names = [s.file for s in shards]
        if len(set(names)) != len(names):
            twice = next(n for n in names if names.count(n) > 1)
            raise CacheFormatError(f"{where}: shard {twice} is listed twice")
        return cls(
            **fields,
            metadata=metadata,
            shards=shards,
            build_state=_build_state(state, where),
            format_version=version,
            softcache_version=str(d.get("softcache_version", "unknown")),
            checksummed=checksum is not None,
        )


def _check_fields(d: dict, where: str) -> dict:
    """The settings of a manifest, type- and range-checked; a CacheFormatError names the field."""
    if d["targets"] not in KINDS:
        raise CacheFormatError(f"{where}: unknown target kind {d['targets']!r}")
    if not isinstance(d["shards"], list):
        raise CacheFormatError(f"{where}: shards must be a list")
    if d["backend"] not in BACKENDS:
        raise CacheFormatError(f"{where}: unknown backend {d['backend']!r}")
    vocab = _int(d, "vocab_size", where, 1, MAX_VOCAB)
    k = _int(d, "k", where, 1, min(vocab, MAX_K))
    samples = _int(d, "samples", where, 1, MAX_COUNT, optional=True)
    temps = d["temperatures"]
    if not isinstance(temps, list) or not temps or any(
        isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and t > 0) for t in temps
    ) or len(set(temps)) != len(temps):
        raise CacheFormatError(f"{where}: temperatures must be distinct finite positive numbers, got {temps!r}")
    if not isinstance(d["codec"], dict):
        raise CacheFormatError(f"{where}: codec must be an object, got {d['codec']!r}")
    extras = d.get("extras", {})
    if not isinstance(extras, dict) or not all(e in EXTRAS and isinstance(s, dict) for e, s in extras.items()):
        known = ", ".join(EXTRAS)
        raise CacheFormatError(f"{where}: extras must map known streams ({known}) to settings, got {extras!r}")
    if extras and d["format_version"] < 2:
        raise CacheFormatError(f"{where}: extras need format_version 2")
    try:
        configure(extras)
    except ValueError as e:
        raise CacheFormatError(f"{where}: extras: {e}") from None
    try:
        codec.CodecParams(**d["codec"])
        get_kind(d["targets"]).check_settings(k, vocab, [float(t) for t in temps], samples)
    except (TypeError, ValueError) as e:
        raise CacheFormatError(f"{where}: {e}") from None
    return {"targets": d["targets"], "k": k, "vocab_size": vocab, "temperatures": [float(t) for t in temps],
            "samples": samples, "backend": d["backend"], "codec": dict(d["codec"]), "extras": dict(extras)}


def _build_state(state: object, where: str) -> BuildState | None:
    if state is None:
        return None
    skipped = state.get("skipped_bad") if isinstance(state, dict) else None
    if not isinstance(skipped, list) or not isinstance(state.get("complete"), bool) or not all(
        _is_int(i) and i >= 0 for i in skipped
    ):
        raise CacheFormatError(f"{where}: build_state must hold complete (true/false) and skipped_bad (indices)")
    rejected = state.get("rejected", [])
    if not isinstance(rejected, list) or not all(_is_int(i) and i >= 0 for i in rejected):
        raise CacheFormatError(f"{where}: build_state rejected must list sample indices, got {rejected!r}")
    return BuildState(state["complete"], list(skipped), list(rejected))


def load_manifest(fs, root: str) -> Manifest:
    """Read and validate the manifest of the cache at ``root`` on filesystem ``fs``."""
    path = join(root, MANIFEST_NAME)
    if not fs.exists(path):
        what = "does not exist" if not fs.exists(root) else f"has no {MANIFEST_NAME}"
        raise CacheFormatError(f"{root} {what}: not a softcache cache (build one with `softcache build`)")
    size = check_plain_file(fs, path, root)
    if size > MAX_MANIFEST_BYTES:
        raise CacheFormatError(f"{path}: {size:,} bytes is too large for a manifest; the file was replaced or damaged")
    try:
        data = json.loads(fs.cat_file(path))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CacheFormatError(f"{path}: manifest is not valid JSON ({e})") from None
    return Manifest.from_dict(data, path)


def save_manifest(fs, root: str, manifest: Manifest) -> None:
    """Atomically replace the manifest: write a temporary file, then rename it over the old one."""
    data = manifest.to_dict()
    Manifest.from_dict(data, "manifest to save")  # the same checks as on reading: never save what cannot load
    if not manifest.checksummed:  # an old cache being appended to: it is checksummed from now on
        manifest.checksummed = True
    path = join(root, MANIFEST_NAME)
    tmp = join(root, tmp_name(MANIFEST_NAME))
    with fs.open(tmp, "wb") as f:
        f.write(json.dumps(data, indent=1, sort_keys=True).encode())
    fs.mv(tmp, path)
