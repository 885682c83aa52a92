"""The output side of a build: checking ``--out`` (resume, refuse, overwrite) and, under ``torchrun``,
merging the ranks' caches into one.

Each rank writes a complete cache of its own in ``OUT/rank-RRRRR-of-WWWWW/`` (so ranks never share a
file or a manifest, and each resumes on its own). When all are done, rank 0 copies their shards, in rank
order, which is dataset order, into ``OUT`` without re-encoding, records the union of their skipped
sequences, marks the cache complete and removes the rank folders. A merge killed half-way continues
where it stopped: the shards already copied are exactly the first ones in rank order.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import torch

from ..errors import BuildConflictError
from ..format import MANIFEST_NAME, BuildState, Manifest, join, load_manifest, open_fs
from ..format.fs import holds_only_temporaries
from ..ranks import rank_world
from ..reader import open_cache
from ..writer import CacheWriter


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
        return cls(*rank_world(), int(os.environ.get("LOCAL_RANK", "0")))

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as td

            td.barrier()


def rank_path(out: str, rank: int, world: int) -> str:
    return join(str(out).rstrip("/"), f"rank-{rank:05d}-of-{world:05d}")


def _differences(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "; ".join(f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in keys)


def check_out(out: str) -> None:
    """The cheap part of :func:`prepare_out`, run before the teacher loads: ``out`` is new, empty, or a cache."""
    fs, root = open_fs(out)
    if not fs.exists(join(root, MANIFEST_NAME)) and not holds_only_temporaries(fs, root):
        raise BuildConflictError(
            f"{out} exists, is not empty and is not a softcache cache; choose a new or empty --out "
            "(--overwrite only replaces softcache caches)"
        )


def prepare_out(out: str, metadata: dict, settings: dict, overwrite: bool, dist: Dist) -> Manifest | None:
    """Check ``out`` before building. Returns the manifest when the same build is already complete, else
    None (new, or to be resumed). A cache of a different build is refused, or deleted with ``overwrite``;
    anything else that is not empty is refused."""
    fs, root = open_fs(out)
    if dist.rank == 0:
        if fs.exists(join(root, MANIFEST_NAME)):
            manifest = load_manifest(fs, root)
            old = manifest.metadata.get("build")
            if old != metadata["build"]:
                if not overwrite:
                    new = metadata["build"]
                    what = _differences(old, new) if isinstance(old, dict) else "not written by softcache build"
                    raise BuildConflictError(
                        f"{out} holds a cache from a different build ({what}); pass --overwrite to replace it, or "
                        "choose another --out"
                    )
                fs.rm(root, recursive=True)
        else:
            check_out(out)
        if dist.world > 1:  # the root manifest, before any rank folder: an unfinished build
            with CacheWriter(out, **settings, metadata=metadata) as root_writer:
                root_writer.manifest.build_state = root_writer.manifest.build_state or BuildState()
                root_writer.save_manifest()
    dist.barrier()
    manifest = load_manifest(fs, root) if fs.exists(join(root, MANIFEST_NAME)) else None
    if manifest is not None and manifest.build_state is not None and manifest.build_state.complete:
        if dist.rank == 0:
            _remove_rank_folders(fs, out, dist.world)
        return manifest
    return None


def merge_rank_caches(out: str, settings: dict, dist: Dist) -> Manifest:
    """Rank 0 copies every rank's shards into ``out`` in rank order; all ranks return the final manifest."""
    dist.barrier()
    fs, root = open_fs(out)
    if dist.rank == 0:
        with CacheWriter(out, **settings) as writer:
            skipped, rejected = [], []
            ranks = [open_cache(rank_path(out, r, dist.world)) for r in range(dist.world)]
            shards = itertools.chain.from_iterable(rank.encoded_shards() for rank in ranks)
            writer.copy_shards(itertools.islice(shards, len(writer.manifest.shards), None))  # resumes a killed merge
            for rank in ranks:
                skipped += rank.manifest.build_state.skipped_bad
                rejected += rank.manifest.build_state.rejected
                rank.close()
            writer.manifest.build_state = BuildState(complete=True, skipped_bad=skipped, rejected=rejected)
            writer.save_manifest()
        _remove_rank_folders(fs, out, dist.world)
    dist.barrier()
    return load_manifest(fs, root)


def _remove_rank_folders(fs, out: str, world: int) -> None:
    for r in range(world):
        path = rank_path(out, r, world)
        if fs.exists(path):
            fs.rm(path, recursive=True)
