"""What users see while training: console lines, a progress bar, TensorBoard and metrics.jsonl.

The trainer hands one ``StepStats`` per optimizer step to ``MetricsWriter.log_step``; the writer
derives throughput (tokens/s, TFLOP/s per GPU, MFU), keeps running totals (skipped steps,
decode failures) and writes, on rank 0 only:

* ``metrics.jsonl`` in the run directory, one JSON object per step (NaN/inf become null),
* TensorBoard scalars under ``tensorboard_dir`` (every ``tensorboard_log_interval`` steps), and
  the same scalars in Weights & Biases with ``wandb_project`` (WANDB_MODE=offline: local files),
* a console line every ``log_interval`` steps (or a tqdm progress bar plus those lines).

Other ranks build the same records (cheap) but write nothing, so callers never branch on rank.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from megatron_sail.config.run import to_dict
from megatron_sail.training.flops import device_peak_flops
from megatron_sail.training.flops import mfu as _mfu
from megatron_sail.training.moe_metrics import LOAD_BALANCING_LOSS

METRICS_FILE = "metrics.jsonl"
VALID_METRICS_FILE = "valid_metrics.jsonl"


@dataclass
class StepStats:
    """Numbers the trainer measured for one optimizer step (global over data-parallel ranks)."""

    iteration: int
    """Optimizer step just finished, counting from 1."""
    lm_loss: float
    """Loss of the step, averaged over its loss tokens (NaN when the step was skipped for NaN)."""
    lr: dict[str, float]
    """Learning rate per parameter group, named as optimizer.group_lrs names them
    (e.g. {'lr/default': 1e-5, 'lr/group1_no_wd': 1e-5})."""
    grad_norm: float | None
    """Gradient norm before clipping; None when not computed."""
    step_time_s: float
    """Wall time of the whole step, data wait included."""
    tokens: int
    """Real tokens trained on in this step, all data-parallel ranks together."""
    samples: int
    """Packed rows trained on in this step, all data-parallel ranks together."""
    images: int = 0
    """Images in this step's rows."""
    tiles: int = 0
    """Image tiles (thumbnails included) in this step's rows."""
    flops: float = 0.0
    """Model FLOPs of the step on all devices together (training/flops.py step_flops)."""
    data_wait_s: float = 0.0
    """Time spent waiting for the next batch (data loading + image decoding not hidden)."""
    skipped: bool = False
    """The update was skipped (NaN/Inf in loss or gradients)."""
    decode_failures: int = 0
    """Images that failed to decode in this step (replaced by the pipeline's fallback)."""
    consumed_samples: int = 0
    """Rows consumed since the start of training (from the train state, so resumes continue)."""
    consumed_tokens: int = 0
    """Tokens consumed since the start of training."""
    source_loss: dict[str, float] = field(default_factory=dict)
    """Loss of each --data-path source over its own loss tokens in this step (blends only)."""
    source_loss_tokens: dict[str, float] = field(default_factory=dict)
    """Loss tokens of each source in this step; token-weighted, the source losses average to
    lm_loss."""
    moe_losses: dict[str, float] = field(default_factory=dict)
    """MoE auxiliary losses of the step by Megatron-LM's name (``load_balancing_loss``: mean
    over MoE layers and micro-batches, DP ranks averaged; training/moe_metrics.py); {} when
    the model is dense."""
    extra: dict[str, float] = field(default_factory=dict)
    """Stage-specific scalars by TensorBoard tag (post-training: rewards per function, KL,
    clip fraction, ...; posttrain/grpo.py, posttrain/dpo.py); written as they are, {} for SFT stages."""


@dataclass
class MetricsConfig:
    """How metrics are reported (the writer's optional settings)."""

    total_iters: int | None = None
    """Steps the run will make, for step/total and ETA; None shows no total."""
    world_size: int = 1
    """Devices the step's FLOPs are spread over, for TFLOP/s per GPU."""
    peak_flops: float | None = None
    """Dense bf16 peak of one device (flops.device_peak_flops); None -> MFU is NaN/null."""
    progress_bar: bool = False
    """Show a tqdm progress bar (the quickstart) in addition to the interval lines."""
    log_throughput: bool = True
    """Tokens/s, TFLOP/s/GPU and MFU in the console line (Megatron-LM's --log-throughput)."""
    tensorboard_log_interval: int = 1
    """Steps between TensorBoard / W&B scalar writes (Megatron-LM's --tensorboard-log-interval)."""
    wandb_project: str | None = None
    """W&B project; None: no W&B."""
    wandb_exp_name: str | None = None
    """W&B run name (None: the run directory's name)."""
    wandb_save_dir: str | None = None
    """W&B writes its files under <wandb_save_dir>/wandb/ (None: the run directory)."""
    run_config: dict | None = None
    """The resolved run config, stored as the W&B run's config."""
    start_iteration: int = 0
    """Iteration the run starts from; metrics.jsonl and valid_metrics.jsonl records after it
    (steps a crashed run made past its checkpoint, or another run's curve when starting at 0)
    are moved to metrics.superseded.jsonl / valid_metrics.superseded.jsonl, never deleted."""


def peak_memory_bytes() -> int:
    """Peak memory of this process: CUDA allocator peak on a GPU, else the peak resident set size."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _json_safe(value):
    """NaN and inf are not JSON: write them as null so every reader can parse the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


def _window_mean(window: list[dict], key: str) -> list[str]:
    """``["KEY 1.2345"]``: the mean of an optional per-step value over the console window
    ([] when no step of the window has it, e.g. the MoE loss of a dense model)."""
    values = [r[key] for r in window if isinstance(r.get(key), float) and math.isfinite(r[key])]
    return [f"{key} {sum(values) / len(values):.4f}"] if values else []


def _format_eta(seconds: float) -> str:
    """h:mm:ss, or '?' before the first measurement."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    return str(_dt.timedelta(seconds=int(round(seconds))))


def superseded_path(path: Path) -> Path:
    """Where the records a run replaces go: metrics.jsonl -> metrics.superseded.jsonl."""
    return path.with_name(path.name.removesuffix(".jsonl") + ".superseded.jsonl")


def _supersede_after(path: Path, iteration: int) -> int:
    """Move jsonl records with iteration > ``iteration`` (and lines cut short by a crash) from
    ``path`` to its superseded file, appended in their order: a resumed run repeats those steps,
    a fresh run (``iteration`` 0) starts a new curve, and nothing a run wrote is deleted.
    Returns how many lines moved."""
    if not path.exists():
        return 0
    kept, moved = [], []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
            keep = isinstance(rec, dict) and int(rec.get("iteration", 0)) <= iteration
        except (json.JSONDecodeError, TypeError, ValueError):
            keep = False
        (kept if keep else moved).append(line)
    if not moved:
        return 0
    with open(superseded_path(path), "a") as f:
        f.write("".join(f"{line}\n" for line in moved))
        f.flush()
        os.fsync(f.fileno())
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    os.replace(tmp, path)
    return len(moved)


class MetricsWriter:
    """Console, progress bar, TensorBoard and metrics.jsonl output of the training loop."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        tensorboard_dir: str | os.PathLike | None,
        log_interval: int,
        rank: int,
        config: MetricsConfig | None = None,
        stream=None,
    ):
        if log_interval < 1:
            raise ValueError(f"log_interval must be >= 1, got {log_interval}")
        self.cfg = config or MetricsConfig()
        self.log_interval = log_interval
        self.active = rank == 0
        self.stream = stream or sys.stdout
        self.skipped_steps = 0
        self.decode_failures = 0
        self._window: list[dict] = []
        self._tb = None
        self._bar = None
        self._jsonl = None
        self._wandb = None
        self.run_dir = Path(run_dir)
        if not self.active:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / METRICS_FILE
        for name in (METRICS_FILE, VALID_METRICS_FILE):
            moved = _supersede_after(self.run_dir / name, self.cfg.start_iteration)
            if moved:
                self._print(
                    f"[metrics] {moved} records of {name} after iteration "
                    f"{self.cfg.start_iteration} (this run starts there) moved to "
                    f"{superseded_path(self.run_dir / name).name}"
                )
        self._jsonl = open(path, "a", buffering=1)
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(tensorboard_dir))
        if self.cfg.wandb_project:
            self._wandb = _start_wandb(self.cfg, self.run_dir)
        # Off a terminal (nohup, CI, a log file) a bar is one endless carriage-return line: the
        # interval lines already report progress there.
        if self.cfg.progress_bar and self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.cfg.total_iters,
                initial=self.cfg.start_iteration,
                unit="step",
                file=self.stream,
                dynamic_ncols=True,
            )

    def record(self, s: StepStats) -> dict:
        """The JSON record of one step: the measured numbers plus the derived throughput."""
        self.skipped_steps += int(s.skipped)
        self.decode_failures += s.decode_failures
        t = max(s.step_time_s, 1e-12)
        flops_per_gpu = s.flops / t / max(self.cfg.world_size, 1)
        lr_first = next(iter(s.lr.values())) if s.lr else float("nan")
        return {
            "iteration": s.iteration,
            "lm_loss": float(s.lm_loss),
            "lr": float(lr_first),
            "lr_groups": {k: float(v) for k, v in s.lr.items()},
            "grad_norm": None if s.grad_norm is None else float(s.grad_norm),
            "tokens_per_s": s.tokens / t,
            "tflops_per_gpu": flops_per_gpu / 1e12,
            "mfu": _mfu(flops_per_gpu, self.cfg.peak_flops),
            "step_time_s": s.step_time_s,
            "data_wait_s": s.data_wait_s,
            "tokens": s.tokens,
            "samples": s.samples,
            "images": s.images,
            "tiles": s.tiles,
            "consumed_samples": s.consumed_samples,
            "consumed_tokens": s.consumed_tokens,
            "source_loss": {k: float(v) for k, v in s.source_loss.items()},
            "source_loss_tokens": {k: float(v) for k, v in s.source_loss_tokens.items()},
            **{name: float(value) for name, value in s.moe_losses.items()},
            **({"extra": {k: float(v) for k, v in s.extra.items()}} if s.extra else {}),
            "skipped": bool(s.skipped),
            "skipped_steps": self.skipped_steps,
            "decode_failures": self.decode_failures,
            "memory_gib": peak_memory_bytes() / 2**30,
            "time": time.time(),
        }

    def log_step(self, s: StepStats) -> dict:
        """Record one step everywhere it goes; returns the record (also on ranks that write nothing)."""
        rec = self.record(s)
        if not self.active:
            return rec
        self._window.append(rec)
        self._jsonl.write(json.dumps(_json_safe(rec)) + "\n")
        self._write_tensorboard(rec)
        if self._bar is not None:
            self._bar.update(1)
            # this step's loss; the log line shows the mean over its interval (labelled as such)
            self._bar.set_postfix_str(
                f"loss (this step) {rec['lm_loss']:.4f}, {rec['tokens_per_s']:.0f} tokens/s"
            )
        if s.iteration % self.log_interval == 0 or s.iteration == self.cfg.total_iters:
            self._print(self._console_line(self._window))
            self._window = []
            if self._tb is not None:
                self._tb.flush()
        return rec

    def log_eval(
        self, iteration: int, lm_loss: float, split: str = "validation", checkpoint: Optional[str] = None
    ) -> None:
        """Validation loss: a console line, a TensorBoard scalar and a line in valid_metrics.jsonl.
        ``checkpoint``: the --init-from checkpoint validated before any step of this run; the
        line then names it (``checkpoint iter_0001000``) instead of this run's step 0."""
        if not self.active:
            return
        ppl = math.exp(lm_loss) if lm_loss < 50 else float("inf")
        scalars = {f"lm loss {split}": lm_loss, f"lm loss {split} ppl": ppl}  # Megatron-LM's tags
        if self._tb is not None:
            for tag, value in _json_safe(scalars).items():
                if value is not None:
                    self._tb.add_scalar(tag, value, iteration)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(_json_safe(scalars), step=iteration)
        record = {"iteration": iteration, "split": split, "lm_loss": float(lm_loss), "ppl": ppl}
        where = f"step {iteration}"
        if checkpoint is not None:
            record["checkpoint"] = str(checkpoint)
            where = f"checkpoint {os.path.basename(os.path.normpath(checkpoint))}"
        with open(self.run_dir / VALID_METRICS_FILE, "a") as f:
            f.write(json.dumps(_json_safe(record)) + "\n")
        self._print(f"[eval] {where} | {split} lm loss {lm_loss:.4f} | ppl {ppl:.2f}")

    def log_images(
        self,
        iteration: int,
        batch,
        decode: Callable[[list[int]], str],
        mean,
        std,
        image_token_id: int,
        count: int,
    ) -> int:
        """TensorBoard image summaries of the first ``count`` images of a micro-batch
        (data/loading/collate.py MicroBatch): each image's last tile (the thumbnail, or the only tile)
        de-normalized, beside the text of its sample with the <IMG_CONTEXT> runs left out.
        Returns how many were written."""
        spans, tiles = batch.image_spans or [], batch.tiles
        if not self.active or self._tb is None or tiles is None or not tiles.numel():
            return 0
        m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        sd = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        start, written = 0, 0
        for row, lo, hi, n in spans:
            if written == count:
                break
            if start + n > tiles.shape[0]:
                break
            pixels = (tiles[start + n - 1].float().cpu() * sd + m).clamp(0, 1)
            ids = [int(t) for t in batch.tokens[row, lo:hi] if int(t) != image_token_id]
            self._tb.add_image(f"samples/image{written}", pixels, iteration, dataformats="CHW")
            self._tb.add_text(f"samples/text{written}", decode(ids), iteration)
            start, written = start + n, written + 1
        self._tb.flush()
        return written

    def log_benchmarks(
        self,
        iteration: int,
        consumed_tokens: int,
        scores: dict,
        counts: dict,
        seconds: float,
        decoded: Optional[dict] = None,
    ) -> None:
        """Benchmark scores (eval/hook.py): one metrics.jsonl record with ``benchmarks/NAME``
        and ``consumed_tokens`` (what tools/scaling_law.py fits), TensorBoard scalars, a line.
        ``decoded``: NAME -> requests decoded per data-parallel replica (``benchmarks_decoded/``)."""
        if not self.active:
            return
        rec = {
            "iteration": iteration,
            "consumed_tokens": consumed_tokens,
            **{f"benchmarks/{k}": float(v) for k, v in scores.items()},
            **{f"benchmarks_n/{k}": int(n) for k, n in counts.items()},
            **{f"benchmarks_decoded/{k}": [int(x) for x in v] for k, v in (decoded or {}).items()},
            "benchmarks_time_s": seconds,
            "time": time.time(),
        }
        self._jsonl.write(json.dumps(_json_safe(rec)) + "\n")
        if self._tb is not None:
            for k, v in scores.items():
                self._tb.add_scalar(f"benchmarks/{k}", v, iteration)
            self._tb.flush()
        text = " | ".join(f"{k} {v:.2f} (n={counts[k]})" for k, v in scores.items())
        self._print(f"[benchmarks] step {iteration} | {text} | {seconds:.1f}s")

    def _write_tensorboard(self, rec: dict) -> None:
        """One scalar per reported quantity, keyed by iteration (NaN/inf left out of the plots),
        to TensorBoard and W&B alike, every tensorboard_log_interval steps."""
        if self._tb is None and self._wandb is None:
            return
        if rec["iteration"] % self.cfg.tensorboard_log_interval:
            return
        rec = _json_safe(rec)
        it = rec["iteration"]
        scalars = {
            "lm loss": rec["lm_loss"],
            "grad-norm": rec["grad_norm"],
            "throughput/tokens-per-s": rec["tokens_per_s"],
            "throughput/tflops-per-gpu": rec["tflops_per_gpu"],
            "throughput/mfu": rec["mfu"],
            "consumed/samples": rec["consumed_samples"],
            "consumed/tokens": rec["consumed_tokens"],
            "batch/images": rec["images"],
            "batch/tiles": rec["tiles"],
            "skipped-steps": rec["skipped_steps"],
            "decode-failures": rec["decode_failures"],
            "time/data-wait-s": rec["data_wait_s"],
            "time/step-s": rec["step_time_s"],
            "memory/peak-gib": rec["memory_gib"],
        }
        for group, lr in rec["lr_groups"].items():
            scalars[f"learning-rate/{group}"] = lr
        for name, loss in rec["source_loss"].items():
            scalars[f"lm loss/{name}"] = loss
        if rec.get(LOAD_BALANCING_LOSS) is not None:  # Megatron-LM's tag
            scalars[LOAD_BALANCING_LOSS] = rec[LOAD_BALANCING_LOSS]
        scalars.update(rec.get("extra") or {})
        scalars = {tag: value for tag, value in scalars.items() if value is not None}
        if self._tb is not None:
            for tag, value in scalars.items():
                self._tb.add_scalar(tag, value, it)
        if self._wandb is not None:
            self._wandb.log(scalars, step=it)

    def _console_line(self, window: list[dict]) -> str:
        """One line summarizing the steps since the last line (loss averaged, throughput of the last)."""
        last = window[-1]
        losses = [r["lm_loss"] for r in window if not r["skipped"] and math.isfinite(r["lm_loss"])]
        loss = sum(losses) / len(losses) if losses else float("nan")
        step_time = sum(r["step_time_s"] for r in window) / len(window)
        total = self.cfg.total_iters
        eta = (total - last["iteration"]) * step_time if total else float("nan")
        wait = sum(r["data_wait_s"] for r in window) / len(window)
        gn = last["grad_norm"]
        parts = [
            f"step {last['iteration']}/{total if total else '?'}",
            f"eta {_format_eta(eta)}",
            f"loss (mean of {len(losses)} steps) {loss:.4f}",
            *_window_mean(window, LOAD_BALANCING_LOSS),
            f"lr {last['lr']:.3e}",
            f"grad norm {gn:.3f}" if gn is not None else "grad norm -",
            f"data wait {wait * 1000:.1f} ms",
            f"mem {last['memory_gib']:.2f} GiB",
        ]
        if self.cfg.log_throughput:
            parts[5:5] = [
                f"tokens/s {last['tokens_per_s']:.0f}",
                f"TFLOP/s/GPU {last['tflops_per_gpu']:.2f}",
                f"MFU {last['mfu']:.3f}" if math.isfinite(last["mfu"]) else "MFU n/a",
            ]
        if last["skipped_steps"]:
            parts.append(f"skipped {last['skipped_steps']}")
        if last["decode_failures"]:
            parts.append(f"decode failures {last['decode_failures']}")
        stamp = _dt.datetime.now().strftime("%H:%M:%S")
        return f"[{stamp}] " + " | ".join(parts)

    def _print(self, line: str) -> None:
        """Print without breaking the progress bar."""
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        """Flush and close every output (safe to call twice)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _start_wandb(cfg: MetricsConfig, run_dir: Path):
    """A W&B run for the scalars (rank 0 only). Offline (WANDB_MODE=offline) it writes
    <save_dir>/wandb/offline-run-*/ and needs no network; `wandb sync` uploads it later."""
    try:
        import wandb
    except ImportError as e:
        raise RuntimeError("--wandb-project needs the wandb package (requirements.txt)") from e
    save_dir = Path(cfg.wandb_save_dir or run_dir)  # W&B writes into <save_dir>/wandb/
    save_dir.mkdir(parents=True, exist_ok=True)
    return wandb.init(
        project=cfg.wandb_project,
        name=cfg.wandb_exp_name or run_dir.name,
        dir=str(save_dir),
        config=cfg.run_config or {},
    )


@dataclass
class Stopwatch:
    """Named wall-clock sections, summed until ``reset``; for the step-time split.

    ``sync`` is called before each reading (pass torch.cuda.synchronize on a GPU so the time
    of queued kernels lands in the section that queued them).
    """

    sync: Callable[[], None] | None = None
    """Called before reading the clock; None for host-synchronous devices (CPU)."""
    totals: dict[str, float] = field(default_factory=dict)
    """Seconds per section name."""

    def now(self) -> float:
        """The clock after draining queued device work."""
        if self.sync is not None:
            self.sync()
        return time.perf_counter()

    def add(self, name: str, seconds: float) -> None:
        """Add time measured elsewhere (e.g. between hooks) to a section."""
        self.totals[name] = self.totals.get(name, 0.0) + seconds

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        """Time the body of a ``with`` block into section ``name``."""
        start = self.now()
        try:
            yield
        finally:
            self.add(name, self.now() - start)

    def reset(self) -> dict[str, float]:
        """Return the totals so far and start again from zero."""
        out, self.totals = self.totals, {}
        return out


class _BackwardMark(torch.autograd.Function):
    """Identity whose backward runs last in the vision backward: it timestamps the end of it."""

    @staticmethod
    def forward(ctx, x, dummy, timing):
        ctx.timing = timing
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.timing._backward_done()
        return grad, torch.zeros((), device=grad.device), None


class VisionTiming:
    """Times the vision encoder + projector inside a training step, forward and backward.

    Forward: from the encoder's pre-hook to the projector's hook. Backward: from the moment the
    projector output's gradient is ready to the moment the gradient reaches the encoder input
    (a marker on the pixel tensor, so it works inside any pipeline schedule). The rest of the
    forward/backward time is the LM's. Readings go to ``stopwatch`` as 'vit_fwd' and 'vit_bwd';
    with a ``sync`` stopwatch every reading drains the device queue, which costs a little speed,
    so benchmarks time a separate, unhooked run for the headline numbers.
    """

    def __init__(self, encoder: "torch.nn.Module", projector: "torch.nn.Module", stopwatch: Stopwatch):
        self.sw = stopwatch
        self._t0 = self._tgrad = 0.0
        self._mark = any(p.requires_grad for p in encoder.parameters())
        self._dummy = None
        self._handles = [
            encoder.register_forward_pre_hook(self._pre, with_kwargs=True),
            projector.register_forward_hook(self._post),
        ]

    def _pre(self, module, args, kwargs):
        """Start the forward clock; route the pixel tensor through the backward marker."""
        self._t0 = self.sw.now()
        if not (self._mark and torch.is_grad_enabled()):
            return None
        args = list(args)
        for container, key in [(args, i) for i in range(len(args))] + [(kwargs, k) for k in kwargs]:
            x = container[key]
            if torch.is_tensor(x) and x.dim() == 4:
                if self._dummy is None or self._dummy.device != x.device:
                    self._dummy = torch.zeros((), device=x.device, requires_grad=True)
                container[key] = _BackwardMark.apply(x, self._dummy, self)
                break
        return tuple(args), kwargs

    def _post(self, module, args, output):
        """Stop the forward clock; start the backward one when the output's gradient arrives."""
        self.sw.add("vit_fwd", self.sw.now() - self._t0)
        out = output if torch.is_tensor(output) else output[0]
        if torch.is_tensor(out) and out.requires_grad:
            out.register_hook(self._grad_ready)

    def _grad_ready(self, grad):
        self._tgrad = self.sw.now()

    def _backward_done(self):
        self.sw.add("vit_bwd", self.sw.now() - self._tgrad)

    def remove(self) -> None:
        """Detach the hooks (the model runs exactly as before)."""
        for h in self._handles:
            h.remove()
        self._handles = []


__all__ = [
    "MetricsConfig",
    "MetricsWriter",
    "StepStats",
    "Stopwatch",
    "VisionTiming",
    "peak_memory_bytes",
    "METRICS_FILE",
    "VALID_METRICS_FILE",
]


def writer_for_run(cfg, start_iteration: int, **fields) -> MetricsWriter:
    """This rank's MetricsWriter of a run (``cfg``: the RunConfig): its run folder, TensorBoard
    and W&B settings, iterations, world size and this device's peak FLOPs; ``fields`` override
    MetricsConfig fields (post-training logs no throughput)."""
    t = cfg.train
    settings = dict(
        total_iters=t.train_iters,
        world_size=torch.distributed.get_world_size(),
        peak_flops=device_peak_flops(),
        progress_bar=t.progress_bar,
        start_iteration=start_iteration,
        log_throughput=t.log_throughput,
        tensorboard_log_interval=t.tensorboard_log_interval,
        wandb_project=t.wandb_project,
        wandb_exp_name=t.wandb_exp_name,
        wandb_save_dir=t.wandb_save_dir,
        run_config=to_dict(cfg),
    )
    settings.update(fields)
    return MetricsWriter(
        t.run_dir, t.tensorboard_dir, t.log_interval, torch.distributed.get_rank(), MetricsConfig(**settings)
    )
