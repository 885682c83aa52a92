"""How the build cuts the work: windows, ranks, length-grouped batches, and the writer thread.

Sequences are cut into *windows* of about ``window_tokens`` tokens, in dataset order. Inside a window,
sequences are sorted by length and grouped into batches of at most ``batch_tokens`` padded tokens, then
written back in dataset order. Windows depend only on the sequence lengths and the options, so a resumed
run recomputes exactly the batches an uninterrupted run would (it redoes the window it stopped in and
writes only the sequences not yet committed), and ranks take contiguous runs of whole windows.
"""

from __future__ import annotations

import queue
import threading

import numpy as np


def windows(lengths: np.ndarray, window_tokens: int) -> list[tuple[int, int]]:
    """[start, end) sequence ranges of about ``window_tokens`` tokens each, covering all sequences."""
    bounds, acc = [0], 0
    for i, length in enumerate(lengths.tolist()):
        acc += length
        if acc >= window_tokens:
            bounds.append(i + 1)
            acc = 0
    if bounds[-1] != len(lengths):
        bounds.append(len(lengths))
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def rank_windows(wins: list[tuple[int, int]], lengths: np.ndarray, rank: int, world: int) -> list[tuple[int, int]]:
    """The contiguous run of windows rank ``rank`` of ``world`` builds (balanced by tokens)."""
    if world == 1:
        return wins
    cum = np.concatenate([[0], np.cumsum(lengths)])
    total = cum[-1]
    return [(a, b) for a, b in wins if min(world - 1, int(cum[a] * world // total)) == rank]


def batches(lengths: np.ndarray, start: int, end: int, batch_tokens: int) -> list[list[int]]:
    """Sequences [start, end) sorted by length (longest first), grouped so that batch size × longest
    length ≤ ``batch_tokens`` (a sequence longer than that forms a batch alone)."""
    order = sorted(range(start, end), key=lambda i: (-int(lengths[i]), i))
    out: list[list[int]] = []
    for i in order:
        if out and (len(out[-1]) + 1) * int(lengths[out[-1][0]]) <= batch_tokens:
            out[-1].append(i)
        else:
            out.append([i])
    return out


REJECTED = "rejected"
"""In place of a result: a sample that ``softcache generate``'s filter rejected (counted in the build state)."""


class BackgroundWriter:
    """Hands finished sequences to a :class:`~softcache.CacheWriter` on a thread, in dataset order, so
    that the teacher does not wait for encoding and disk. Sequences dropped by ``--skip-bad`` are recorded
    in the writer's build state in the same order, so each saved manifest counts exactly the sequences
    consumed up to its last committed shard. Only this thread touches the writer while it runs."""

    def __init__(self, writer, max_pending: int = 4) -> None:
        self.writer = writer
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="softcache-writer", daemon=True)
        self._thread.start()

    def put(self, items: list[tuple[int, np.ndarray, tuple | None]]) -> None:
        """``items``: (sequence index, input_ids, (target_ids, values, lognorm) or None when skipped (or
        :data:`REJECTED`), loss mask or None)."""
        while True:
            self._raise_if_failed()
            try:
                self._queue.put(items, timeout=0.5)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Write everything queued, then stop; re-raises an error from the thread."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"writing the cache failed: {self._error}") from self._error

    def _run(self) -> None:
        try:
            while (items := self._queue.get()) is not None:
                for index, input_ids, result, mask in items:
                    if result is None:
                        self.writer.manifest.build_state.skipped_bad.append(int(index))
                    elif isinstance(result, str) and result == REJECTED:
                        self.writer.manifest.build_state.rejected.append(int(index))
                    else:
                        self.writer.write_values(input_ids, *result, loss_mask=mask)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            self._error = e
            while self._queue.get() is not None:  # drain so that the producer never blocks forever
                pass
