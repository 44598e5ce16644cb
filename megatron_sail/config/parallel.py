"""Parallel layout of one run: tensor, sequence, pipeline (incl. virtual), expert parallelism.

Data parallelism is whatever is left of the world size after TP x PP. Expert parallelism (EP)
splits the routed experts of MoE layers over ranks; as in Megatron-Core it lives inside the
data-parallel x tensor-parallel ranks of a stage (TP x EP x PP must divide the world size), and
the experts' gradients are reduced over the ranks left after EP (the expert-data-parallel group).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ParallelConfig:
    """How the model is split over ranks."""

    tp: int = 1
    """Tensor-parallel size (ViT and LM both)."""
    pp: int = 1
    """Pipeline-parallel size; the ViT and projector live on the first stage."""
    sp: bool = False
    """Sequence parallelism inside the TP group (needs tp > 1 to have an effect)."""
    vpp: int | None = None
    """Virtual pipeline stages (model chunks) per pipeline rank; None = no interleaving."""
    ep: int = 1
    """Expert-parallel size (Megatron-LM's --expert-model-parallel-size): routed experts are
    split over this many ranks; must divide the number of experts."""
    first_stage_layers: int | None = None
    """LM layers on the first pipeline stage (lighter, since it also runs the ViT); None = even."""
    last_stage_layers: int | None = None
    """LM layers on the last pipeline stage (it also runs the output layer and loss); None = even."""
    distributed_timeout_minutes: int = 10
    """Timeout of the process groups' collectives (Megatron-LM's --distributed-timeout-minutes):
    a rank that stops answering fails the job after this long instead of hanging it."""
    overlap_grad_reduce: bool | None = None
    """Megatron-LM's --overlap-grad-reduce: reduce gradient buckets during the backward pass
    (Megatron-Core DDP); None: on with CUDA, off on CPU."""
    overlap_param_gather: bool | None = None
    """Megatron-LM's --overlap-param-gather: all-gather the distributed optimizer's updated
    parameters during the next forward; needs the distributed optimizer and overlapped grad
    reduce. None: on with CUDA and the distributed optimizer."""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Refuse sizes no layout can have; run again after fields were set (flags)."""
        if self.tp < 1 or self.pp < 1 or self.ep < 1:
            raise ValueError(
                f"ParallelConfig: tp, pp and ep must be >= 1, got tp={self.tp} pp={self.pp} ep={self.ep}"
            )
        if self.distributed_timeout_minutes < 1:
            raise ValueError(
                f"--distributed-timeout-minutes must be >= 1, got {self.distributed_timeout_minutes}"
            )
        if self.vpp is not None and (self.vpp < 1 or self.pp < 2):
            raise ValueError(f"ParallelConfig: vpp={self.vpp} needs pp >= 2 and vpp >= 1")

    @property
    def sequence_parallel(self) -> bool:
        """SP is only meaningful with TP > 1; Megatron rejects it otherwise."""
        return self.sp and self.tp > 1

    def check_experts(self, num_experts: int) -> None:
        """Refuse expert layouts that Megatron-Core would reject later, or deep inside a
        layer: EP without routed experts, experts that do not split evenly over the EP ranks,
        and an MoE model trained with TP but without sequence parallelism (megatron-core
        0.16.1's MoELayer raises on it at the first training forward)."""
        if self.ep > 1 and num_experts <= 0:
            raise ValueError(
                f"--expert-model-parallel-size {self.ep} needs a mixture-of-experts "
                "language model (num_experts > 0, e.g. family qwen3_moe); this "
                "model is dense"
            )
        if num_experts and num_experts % self.ep:
            raise ValueError(
                f"--expert-model-parallel-size {self.ep} must divide the number of experts ({num_experts})"
            )
        if num_experts and self.tp > 1 and not self.sp:
            raise ValueError(
                f"a mixture-of-experts model at --tensor-model-parallel-size "
                f"{self.tp} needs --sequence-parallel (Megatron-Core's MoE layer "
                "refuses TP without SP in training)"
            )

    def data_parallel_size(self, world_size: int) -> int:
        """Ranks left for data parallelism; errors when TP x PP does not divide the world."""
        if world_size % (self.tp * self.pp):
            raise ValueError(f"world size {world_size} is not divisible by tp*pp={self.tp * self.pp}")
        if world_size % (self.tp * self.ep * self.pp):
            raise ValueError(
                f"world size {world_size} is not divisible by tp*ep*pp="
                f"{self.tp * self.ep * self.pp} (--expert-model-parallel-size {self.ep})"
            )
        return world_size // (self.tp * self.pp)
