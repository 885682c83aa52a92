"""The output side of a build: checking ``--out`` (resume, refuse, overwrite) and, under ``torchrun``,
merging the ranks' caches into one.

Each rank writes a complete cache of its own in ``OUT/rank-RRRRR-of-WWWWW/`` (so ranks never share a
file or a manifest, and each resumes on its own). When all are done, rank 0 copies their shards, in rank
order, which is dataset order, into ``OUT`` without re-encoding, records the union of their skipped
sequences, marks the cache complete and removes the rank folders. A merge killed half-way continues
where it stopped: the shards already copied are exactly the first ones in rank order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .format import MANIFEST_NAME, load_manifest, save_manifest
from .format.backend import join
from .reader import open_cache
from .writer import CacheWriter, open_fs


class BuildConflictError(ValueError):
    """``--out`` holds something this build must not write into."""


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int | None = None

    @classmethod
    def from_env(cls, device: str | None) -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        import torch.distributed as td

        if not td.is_initialized():
            use_nccl = torch.cuda.is_available() and device != "cpu"
            if use_nccl:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            td.init_process_group(backend="nccl" if use_nccl else "gloo")
        return cls(td.get_rank(), td.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as td

            td.barrier()


def rank_path(out: str, rank: int, world: int) -> str:
    return join(str(out).rstrip("/"), f"rank-{rank:05d}-of-{world:05d}")


def _differences(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "; ".join(f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in keys)


def prepare_out(out: str, metadata: dict, settings: dict, overwrite: bool, dist: Dist) -> dict | None:
    """Check ``out`` before building. Returns the manifest when the same build is already complete, else
    None (new, or to be resumed). A cache of a different build is refused, or deleted with ``overwrite``;
    anything else that is not empty is refused."""
    fs, root = open_fs(out)
    if dist.rank == 0:
        if fs.exists(join(root, MANIFEST_NAME)):
            manifest = load_manifest(fs, root)
            old = (manifest.get("metadata") or {}).get("build")
            if old != metadata["build"]:
                if not overwrite:
                    new = metadata["build"]
                    what = _differences(old, new) if isinstance(old, dict) else "not written by softcache build"
                    raise BuildConflictError(
                        f"{out} holds a cache from a different build ({what}); pass --overwrite to replace it, or "
                        "choose another --out"
                    )
                fs.rm(root, recursive=True)
        elif fs.exists(root) and fs.ls(root, detail=False):
            raise BuildConflictError(
                f"{out} exists, is not empty and is not a softcache cache; choose a new or empty --out "
                "(--overwrite only replaces softcache caches)"
            )
        if dist.world > 1:
            CacheWriter(out, **settings, metadata=metadata).close()  # the root manifest, before any rank folder
    dist.barrier()
    manifest = load_manifest(fs, root) if fs.exists(join(root, MANIFEST_NAME)) else None
    if manifest is not None and manifest["metadata"].get("complete"):
        if dist.rank == 0:
            _remove_rank_folders(fs, out, dist.world)
        return manifest
    return None


def merge_rank_caches(out: str, settings: dict, dist: Dist) -> dict:
    """Rank 0 copies every rank's shards into ``out`` in rank order; all ranks return the final manifest."""
    dist.barrier()
    fs, root = open_fs(out)
    if dist.rank == 0:
        with CacheWriter(out, **settings) as writer:
            copied, n, skipped = len(writer.manifest["shards"]), 0, []
            for r in range(dist.world):
                sub = open_cache(rank_path(out, r, dist.world))
                for s, entry in enumerate(sub.manifest["shards"]):
                    if n >= copied:
                        reader = sub._reader(s)
                        batches = ((m, reader.read_batch(b)) for b, m in enumerate(entry["batches"]))
                        writer.copy_shard(reader.header, batches, entry)
                    n += 1
                skipped += sub.manifest["metadata"]["skipped_bad"]
                sub.close()
            meta = writer.manifest["metadata"]
            meta["skipped_bad"], meta["complete"] = skipped, True
            save_manifest(writer.fs, writer.root, writer.manifest)
        _remove_rank_folders(fs, out, dist.world)
    dist.barrier()
    return load_manifest(fs, root)


def _remove_rank_folders(fs, out: str, world: int) -> None:
    for r in range(world):
        path = rank_path(out, r, world)
        if fs.exists(path):
            fs.rm(path, recursive=True)
