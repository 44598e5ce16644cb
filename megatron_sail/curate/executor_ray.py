"""Ray executor: the same per-shard work as Ray tasks on actors (any curation pass, curate/job.py).

Each actor holds one model (``num_gpus=gpus_per_worker``: one GPU per captioner on a GPU
cluster) and captions one shard at a time; the driver keeps every actor busy, retries a shard
that raised or whose actor died (the actor is replaced) up to ``shard_retries`` times, and
writes nothing itself: actors write the shards to the shared output folder.
"""

from __future__ import annotations

from megatron_sail.curate.executor_local import failure, worker_from
from megatron_sail.curate.reader import ShardSpec


class _Captioner:
    """Actor body: one ShardWorker (one loaded model)."""

    def __init__(self, cfg):
        self.worker = worker_from(cfg)
        self.worker.load()

    def process(self, spec: ShardSpec) -> tuple[dict, int]:
        before = self.worker.retries()
        marker = self.worker.process(spec)
        return marker, self.worker.retries() - before


class RayExecutor:
    """Starts (or joins) Ray, runs the shards on ``workers`` actors."""

    def __init__(self, cfg):
        self.cfg = cfg

    def _start(self):
        try:
            import ray
        except ImportError as e:
            raise ImportError("--executor ray needs the package ray (pinned in requirements.txt)") from e
        if not ray.is_initialized():
            if self.cfg.ray_address:
                ray.init(address=self.cfg.ray_address, log_to_driver=False)
            else:
                ray.init(
                    num_cpus=self.cfg.ray_num_cpus,
                    include_dashboard=False,
                    log_to_driver=False,
                    runtime_env={"env_vars": {"OMP_NUM_THREADS": str(max(1, int(self.cfg.cpus_per_worker)))}},
                )
        return ray

    def run(self, pending: list[ShardSpec], bar) -> tuple[dict, list, int]:
        """(markers by shard name, failed shards, request retries)."""
        if not pending:
            return {}, [], 0
        ray = self._start()
        actor_cls = ray.remote(num_cpus=self.cfg.cpus_per_worker, num_gpus=self.cfg.gpus_per_worker)(
            _Captioner
        )
        actors = [actor_cls.remote(self.cfg) for _ in range(min(self.cfg.workers, len(pending)))]
        queue = [(s, 1) for s in pending]
        running: dict = {}
        results, failed, retries = {}, [], 0

        def submit(actor) -> None:
            spec, attempt = queue.pop(0)
            running[actor.process.remote(spec)] = (actor, spec, attempt)

        for actor in actors:
            if queue:
                submit(actor)
        while running:
            [ref], _ = ray.wait(list(running), num_returns=1)
            actor, spec, attempt = running.pop(ref)
            try:
                marker, r = ray.get(ref)
                results[spec.name] = marker
                retries += r
                if bar is not None:
                    bar.update(marker["samples"])
            except Exception as e:  # noqa: BLE001 - RayTaskError or RayActorError
                if isinstance(e, ray.exceptions.RayActorError):
                    actor = actor_cls.remote(self.cfg)  # the old one died: replace it
                    actors.append(actor)
                if attempt > self.cfg.shard_retries:
                    failed.append(failure(spec, e, attempt))
                else:
                    queue.insert(0, (spec, attempt + 1))
            if queue:
                submit(actor)
        for actor in actors:
            ray.kill(actor)
        return results, failed, retries
