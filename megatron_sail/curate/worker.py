"""The per-shard work every executor runs: read -> caption -> write one shard."""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Iterator, Optional

from megatron_sail.curate.backends import BackendConfig, make_backend
from megatron_sail.curate.caption import CaptionStage
from megatron_sail.curate.prompts import PromptBank, PromptBankConfig
from megatron_sail.curate.reader import ReaderConfig, ReadStage, Sample, ShardSpec
from megatron_sail.curate.writer import ShardWriter
from megatron_sail.data.images.imageinfo import check_decodable

_END = object()
"""Marks the end of a shard in the prefetch queue."""


class ShardWorker:
    """Holds one loaded backend (one model per process / Ray actor / GPU) and captions shards."""

    def __init__(
        self,
        reader: ReaderConfig,
        backend: BackendConfig,
        prompts: PromptBankConfig,
        out_dir: str,
        max_pixels: int,
    ):
        self.reader = ReadStage(reader)
        self.backend_cfg = backend
        self.bank = PromptBank(prompts)
        self.out_dir = out_dir
        self.max_pixels = max_pixels
        self.stage: Optional[CaptionStage] = None

    def load(self) -> None:
        """Load the backend now (errors surface before any shard is opened)."""
        self._stage()

    def _stage(self) -> CaptionStage:
        """The backend is loaded on first use (in the worker process, not the driver)."""
        if self.stage is None:
            cfg = self.backend_cfg
            backend = make_backend(cfg)
            settings = {
                "model": backend.model_id,
                "backend": cfg.backend,
                "seed": self.bank.seed,
                "max_new_tokens": cfg.max_new_tokens,
                "temperature": cfg.temperature,
                "top_p": cfg.top_p,
            }
            self.stage = CaptionStage(backend, self.bank, settings)
        return self.stage

    def retries(self) -> int:
        """Request retries the backend made so far (openai)."""
        return getattr(self.stage.backend, "retries", 0) if self.stage else 0

    def process(self, spec: ShardSpec, progress: Optional[Callable[[int], None]] = None) -> dict:
        """Caption one shard completely; on any exception the partial files are removed."""
        stage = self._stage()
        start = time.time()
        writer = ShardWriter(self.out_dir, spec.name)
        try:
            batch: list[Sample] = []
            for sample, why in self._prefetched(spec):
                if writer.seen(sample.key) or any(b.key == sample.key for b in batch):
                    writer.reject(sample, "duplicate_key", f"key {sample.key} appears twice in the shard")
                elif sample.error is not None:
                    writer.reject(sample, sample.error.reason, sample.error.detail)
                elif why is not None:
                    writer.reject(sample, "undecodable_image", why)
                else:
                    batch.append(sample)
                    if len(batch) >= self.backend_cfg.batch_size:
                        self._flush(stage, spec, batch, writer, progress)
                        batch = []
                    continue
                if progress:
                    progress(1)
            self._flush(stage, spec, batch, writer, progress)
            return writer.commit(
                {
                    "source": spec.source,
                    "start": spec.start,
                    "stop": spec.stop,
                    "seconds": round(time.time() - start, 3),
                }
            )
        except BaseException:
            writer.abort()
            raise

    def _prefetched(self, spec: ShardSpec) -> Iterator[tuple[Sample, Optional[str]]]:
        """(sample, why it is undecodable or None), read and decode-checked by a thread a few
        batches ahead, so reading and PIL decoding overlap the model's generation (PIL
        releases the GIL while decoding). Order is the input order."""
        items: queue.Queue = queue.Queue(maxsize=4 * self.backend_cfg.batch_size)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    items.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for sample in self.reader.read(spec):
                    why = None if sample.error is not None else check_decodable(sample.image, self.max_pixels)
                    if not put((sample, why)):
                        return
                put(_END)
            except BaseException as e:  # noqa: BLE001 - re-raised in the consuming thread
                put(e)

        thread = threading.Thread(target=produce, name=f"read-{spec.name}", daemon=True)
        thread.start()
        try:
            while True:
                item = items.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join()

    def _flush(
        self,
        stage: CaptionStage,
        spec: ShardSpec,
        batch: list[Sample],
        writer: ShardWriter,
        progress: Optional[Callable[[int], None]],
    ) -> None:
        """Caption one batch and write each outcome."""
        if not batch:
            return
        for c in stage.run(spec.name, batch):
            if c.reason is None:
                writer.add(c.sample, c.caption, c.provenance)
            else:
                writer.reject(c.sample, c.reason, c.detail, c.provenance)
        if progress:
            progress(len(batch))

    def close(self) -> None:
        if self.stage is not None:
            self.stage.backend.close()
