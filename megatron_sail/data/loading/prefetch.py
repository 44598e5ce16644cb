"""A background thread that assembles micro-batches ahead of the training step.

The loader holds no random state: micro-batch k is a pure function of the k-th row list the
source yields, so its position (micro-batches consumed) is its whole resumable state. Decoding
and resizing release the GIL (PIL, DALI, torch ops), so the thread overlaps with compute.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator

from megatron_sail.data.images.pipeline import ImagePipeline
from megatron_sail.data.loading.collate import MicroBatch, collate_rows
from megatron_sail.data.records import PackedRow

_END = object()


class _Failure:
    """Carries an exception from the worker thread to the consumer."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class PrefetchLoader:
    """Yields MicroBatches in source order, keeping up to ``depth`` of them ready.

    ``source(position)`` must return the row lists starting at micro-batch ``position`` (for a
    plain iterable, ``lambda p: itertools.islice(rows(), p, None)``). Data-parallel sharding is
    the source's business; the loader only keeps order. ``row_stats(rows)``, if given, returns
    (real tokens, FLOPs) of a row list; they ride on its micro-batch (``real_tokens``, ``flops``),
    so they cannot fall out of step with it.
    """

    def __init__(
        self,
        source: Callable[[int], Iterable[list[PackedRow]]],
        pipeline: ImagePipeline,
        depth: int = 2,
        position: int = 0,
        pin_memory: bool = False,
        image_token_id: int | None = None,
        tokens_per_tile: int = 256,
        row_stats: Callable[[list[PackedRow]], tuple[float, float]] | None = None,
    ) -> None:
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self.position = position
        """Micro-batches handed out so far (including those skipped by resuming)."""
        self._pipeline = pipeline
        self._pin = pin_memory
        self._image_token_id = image_token_id
        self._tokens_per_tile = tokens_per_tile
        self._row_stats = row_stats
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(
            target=self._work, args=(iter(source(position)),), name="prefetch-loader", daemon=True
        )
        self._thread.start()

    def _work(self, rows_iter: Iterator[list[PackedRow]]) -> None:
        """Collate row lists in order and queue them; forward any exception to the consumer."""
        try:
            for rows in rows_iter:
                mb = collate_rows(
                    rows,
                    self._pipeline,
                    image_token_id=self._image_token_id,
                    tokens_per_tile=self._tokens_per_tile,
                )
                if self._row_stats is not None:
                    mb.real_tokens, mb.flops = self._row_stats(rows)
                if self._pin:
                    mb = mb.pin_memory()
                if not self._put(mb):
                    return
            self._put(_END)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer thread
            self._put(_Failure(e))

    def _put(self, item: object) -> bool:
        """Queue an item, giving up when the loader is closed; True when queued."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> "PrefetchLoader":
        return self

    def __next__(self) -> MicroBatch:
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, _Failure):
            self._done = True
            raise item.exc
        self.position += 1
        return item

    def state_dict(self) -> dict:
        """Everything needed to resume: build a new loader with ``position=state['position']``."""
        return {"position": self.position}

    def close(self) -> None:
        """Stop the worker thread and drop queued micro-batches."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                pass
        self._done = True

    def __enter__(self) -> "PrefetchLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
