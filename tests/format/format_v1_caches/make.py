"""How the caches beside this file were made: run once from the repository root with the code of commit 87c5912
(format_version 1, before the package was reshaped). Not run by the tests; kept as the record of what they hold."""

import os
import shutil

import numpy as np
import torch

import softcache

out = "tests/format/format_v1_caches"  # written as tests/data/format_v1, moved here unchanged
shutil.rmtree(out, ignore_errors=True)
os.makedirs(out)
rng = np.random.default_rng(1234)
V = 37
seqs = [rng.integers(0, V, size=n) for n in (5, 9, 3, 7)]
logits = [torch.from_numpy(rng.normal(size=(len(s), V)) * 3).float() for s in seqs]
KINDS = {
    "topk": dict(k=5, targets="topk", temperatures=(1.0, 2.0)),
    "sampled": dict(k=8, targets="sampled", samples=8, temperatures=(1.5,)),
}
expected = {}
for backend in ("arrow", "zarr"):
    for kind, kw in KINDS.items():
        name = f"{kind}_{backend}"
        with softcache.CacheWriter(
            f"{out}/{name}", vocab_size=V, backend=backend, batch_tokens=8, shard_tokens=14, seed=7,
            metadata={"purpose": "format_version 1 compatibility test"}, **kw,
        ) as w:
            for s, z in zip(seqs, logits, strict=True):
                w.write_logits(torch.from_numpy(s), z)
        c = softcache.open_cache(f"{out}/{name}")
        for i in range(len(c)):
            for key, v in c[i].items():
                expected[f"{name}/{i}/{key}"] = np.asarray(v)
            for t in kw["temperatures"]:
                ids, lp = c.targets(i, temperature=t)
                expected[f"{name}/{i}/targets@{t}/ids"] = ids
                expected[f"{name}/{i}/targets@{t}/logprobs"] = lp
        print(name, len(c), c.num_tokens, len(c.manifest["shards"]))
np.savez_compressed(f"{out}/expected.npz", **expected)
