"""``softcache info`` and ``stats`` on sampled caches (samples and the widest stored row; distinct ids and the largest
count share instead of a mass that is 1 by construction), and the entropy of top-k caches as bounds that account for
the tail instead of the entropy with the whole tail as one bin."""

import numpy as np
import pytest
from click.testing import CliRunner
from softcache.cli.main import main

import softcache
from softcache.ops import plot_stats, position_stats, summary

V = 400


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("stats")
    rng = np.random.default_rng(0)
    logits = [(rng.standard_normal((n, V)) * 0.3).astype(np.float32) for n in (20, 31, 9)]  # a flat teacher
    out = {}
    for name, opts in (("topk", dict(k=16)), ("sampled", dict(k=64, targets="sampled", samples=20))):
        path = str(root / name)
        with softcache.CacheWriter(path, vocab_size=V, temperatures=(1.0,), **opts) as w:
            for z in logits:
                w.write_logits(rng.integers(0, V, len(z)), z)
        out[name] = path
    out["logits"] = np.concatenate(logits).astype(np.float64)
    return out


def test_info_of_a_sampled_cache_shows_samples_and_the_widest_row(caches):
    cache = softcache.open_cache(caches["sampled"])
    widest = max(int((cache[i]["target_ids"] >= 0).sum(1).max()) for i in range(len(cache)))
    s = summary(cache)
    assert s["samples"] == 20 and widest <= 20 and s["widest_row"].startswith(f"{widest} of 64 slots")
    out = CliRunner().invoke(main, ["info", caches["sampled"]])
    assert "widest_row" in out.output and f"{widest} of 64 slots" in out.output, out.output


def test_sampled_stats_are_distinct_ids_and_the_largest_share(caches, tmp_path):
    cache = softcache.open_cache(caches["sampled"])
    st = position_stats(cache)
    assert "mass" not in st and "entropy_lower" not in st
    ids = np.concatenate([cache[i]["target_ids"] for i in range(len(cache))])
    np.testing.assert_array_equal(st["distinct"], (ids >= 0).sum(1))
    counts = np.concatenate([np.where(cache[i]["target_ids"] >= 0, np.exp(cache[i]["target_logprobs"]) * 20, 0)
                             for i in range(len(cache))])  # fmt: skip
    np.testing.assert_allclose(st["top_share"], counts.max(1) / 20, rtol=1e-6)
    out = CliRunner().invoke(main, ["stats", caches["sampled"]])
    assert out.exit_code == 0 and "distinct ids per position" in out.output and "largest count share" in out.output
    assert "teacher mass" not in out.output
    pytest.importorskip("matplotlib")
    plot_stats(st, str(tmp_path / "s.png"), "sampled")
    assert (tmp_path / "s.png").stat().st_size > 0


def test_topk_entropy_is_bounded_around_the_true_entropy(caches, tmp_path):
    st = position_stats(softcache.open_cache(caches["topk"]))
    z = caches["logits"]
    logp = z - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)) - z.max(1, keepdims=True)
    true = -(np.exp(logp) * logp).sum(1)
    assert "entropy" not in st  # the one-bin value under an unlabelled name is gone
    assert (st["entropy_lower"] <= true + 1e-2).all() and (true <= st["entropy_upper"] + 1e-2).all()
    one_bin = st["entropy_one_bin"]
    assert (st["entropy_lower"] >= one_bin - 1e-9).all()
    assert np.median(st["entropy_lower"]) > 0.5 * np.median(true) > np.median(one_bin)  # a flat teacher: the one-bin
    out = CliRunner().invoke(main, ["stats", caches["topk"]])  # value is far below the truth; the bound is not
    assert "entropy lower bound" in out.output and "entropy upper bound" in out.output, out.output
    assert "entropy (nats, tail as one bin)" not in out.output
