"""The one seam between this project and megatron-core's (and torch's) private internals.

Every place where the project reaches past a public API (a private function, a method
replaced on an instance, a subclass that overrides a private hook, a file format parsed by
hand, a name patched into a module) lives in this package, one file per area:

- ``dist_checkpointing.py``: Megatron ShardedTensors grouped for DCP, the async-save queue's
  caller hook, torch DCP's wrapped exceptions, the load's DCP reader (tensors read in place or mapped),
  tensor items aligned in the shard files;
- ``optimizer.py``: Adam state on resume, optimizer state made before a load, the phases of
  ``MegatronOptimizer.step()``;
- ``ddp.py``: the forward pre-hooks of Megatron DDP's overlapped param gather;
- ``transformer_layer.py``: a TransformerLayer's bias-dropout-add steps, a linear's bias removed;
- ``moe.py``: the router GEMM without Transformer Engine;
- ``indexed.py``: the ``.idx`` index format of Megatron's IndexedDataset;
- ``te.py``: whether Transformer Engine can run here.

The CPU backend's patches stay in ``platform/cpu.py`` (its own seam), the optimizer-state
layout fitting in ``checkpoint/optimizer_state.py`` (an on-disk fact of a checkpoint), and the
generation engine's module swaps in ``inference/kv_cache.py`` (core attention) and
``inference/plain_layers.py`` (TP=1 parallel layers as plain torch calls), but their version
data is recorded here too, so one table says what an upgrade has to re-check.

Each workaround below names the versions it was written and tested for. Importing this package
compares them with the installed versions and logs one line (``logging``, logger
``megatron_sail.compat``): the installed versions, and, when they differ from what was
verified, which workarounds are unverified on them. ``tests/unit/test_compat.py`` holds one
test per workaround, named after it, that fails when the internal it relies on changed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import metadata

from packaging.specifiers import SpecifierSet
from packaging.version import Version

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Workaround:
    """One reliance on an internal, with the versions it was verified on."""

    name: str
    """Identifier; ``tests/unit/test_compat.py`` has ``test_<name>``."""
    package: str
    """Distribution whose internals it touches (``megatron-core`` or ``torch``)."""
    verified: str
    """PEP 440 specifier of the versions it was written and tested for."""
    where: str
    """Module holding the code (inside compat/, or platform/cpu.py for the CPU backend)."""
    relies_on: str
    """The internal, in a few words."""

    def holds_for(self, version: str) -> bool:
        """Whether ``version`` (local part such as ``+cpu`` ignored) is in the verified range."""
        return Version(version).public in SpecifierSet(self.verified)


MCORE = "megatron-core"
TORCH = "torch"
MCORE_VERIFIED = "==0.16.1"
TORCH_VERIFIED = "==2.13.*"

WORKAROUNDS: tuple[Workaround, ...] = (
    Workaround(
        "sharded_key_groups",
        MCORE,
        MCORE_VERIFIED,
        "compat/dist_checkpointing.py",
        "dist_checkpointing.strategies.torch._replace_state_dict_keys_with_sharded_keys",
    ),
    Workaround(
        "async_caller_hook",
        MCORE,
        MCORE_VERIFIED,
        "compat/dist_checkpointing.py",
        "AsyncCallsQueue._get_async_caller builds the caller of each scheduled save",
    ),
    Workaround(
        "wrapped_exception",
        TORCH,
        TORCH_VERIFIED,
        "compat/dist_checkpointing.py",
        "torch.distributed.checkpoint.utils._wrap_exception (write results that failed)",
    ),
    Workaround(
        "load_reader",
        MCORE,
        MCORE_VERIFIED,
        "compat/dist_checkpointing.py",
        "dist_checkpointing.strategies.torch._get_filesystem_reader builds the load's DCP reader",
    ),
    Workaround(
        "aligned_items",
        TORCH,
        TORCH_VERIFIED,
        "compat/dist_checkpointing.py",
        "torch.distributed.checkpoint.filesystem._write_item writes one item at stream.tell() "
        "(Megatron's async writer imports it by name)",
    ),
    Workaround(
        "direct_read",
        TORCH,
        TORCH_VERIFIED,
        "compat/dist_checkpointing.py",
        "FileSystemReader.storage_data/_slice_file and torch.load(map_location='meta')'s "
        "storage._checkpoint_offset",
    ),
    Workaround(
        "adam_step_on_load",
        MCORE,
        MCORE_VERIFIED,
        "compat/optimizer.py",
        "DistributedOptimizer._set_main_param_and_optimizer_states, replaced per instance",
    ),
    Workaround(
        "shared_adam_step",
        MCORE,
        MCORE_VERIFIED,
        "compat/optimizer.py",
        "torch Adam's per-param 'step' restored as one shared tensor",
    ),
    Workaround(
        "dummy_optimizer_states",
        MCORE,
        MCORE_VERIFIED,
        "compat/optimizer.py",
        "DistributedOptimizer._init_optimizer_states_with_dummy_values",
    ),
    Workaround(
        "step_phases",
        MCORE,
        MCORE_VERIFIED,
        "compat/optimizer.py",
        "MegatronOptimizer.step() = prepare_grads, get_grad_norm, clip, step_with_ready_grads",
    ),
    Workaround(
        "chained_optimizer_layout",
        MCORE,
        MCORE_VERIFIED,
        "checkpoint/optimizer_state.py",
        "optimizer state dict layout: one optimizer's param_groups at the top or under "
        "'optimizer', a ChainedOptimizer's under 0, 1, ...; groups matched by "
        "param_group_identifier_keys (or pre_<key>)",
    ),
    Workaround(
        "param_gather_hooks",
        MCORE,
        MCORE_VERIFIED,
        "compat/ddp.py",
        "DistributedDataParallel.use_forward_hook / remove_forward_pre_hook_handles",
    ),
    Workaround(
        "layer_bda_hooks",
        MCORE,
        MCORE_VERIFIED,
        "compat/transformer_layer.py",
        "TransformerLayer calls self.self_attn_bda / self.mlp_bda(training, fused)(out_with_bias, "
        "residual, prob)",
    ),
    Workaround(
        "qkv_bias_off",
        MCORE,
        MCORE_VERIFIED,
        "compat/transformer_layer.py",
        "parallel linears read self.bias (None: none) and TE's use_bias in forward",
    ),
    Workaround(
        "core_attention_swap",
        MCORE,
        MCORE_VERIFIED,
        "inference/kv_cache.py",
        "Attention.core_attention is an attribute called as (query, key, value, attention_mask, "
        "attn_mask_type=, attention_bias=, packed_seq_params=)",
    ),
    Workaround(
        "plain_parallel_layers",
        MCORE,
        MCORE_VERIFIED,
        "inference/plain_layers.py",
        "Column/RowParallelLinear.forward return (output, bias) per skip_bias_add; "
        "VocabParallelEmbedding.reduce_scatter_embeddings; tp_group",
    ),
    Workaround(
        "router_gemm_without_te",
        MCORE,
        MCORE_VERIFIED,
        "compat/moe.py",
        "moe_utils.te_general_gemm is undefined without Transformer Engine",
    ),
    Workaround(
        "idx_format",
        MCORE,
        MCORE_VERIFIED,
        "compat/indexed.py",
        "IndexedDataset .idx layout (_INDEX_HEADER, version 1, DType codes)",
    ),
    Workaround(
        "cpu_rng_tracker",
        MCORE,
        MCORE_VERIFIED,
        "platform/cpu.py",
        "tensor_parallel.random._get_cuda_rng_state / _set_cuda_rng_state",
    ),
    Workaround(
        "cpu_moe_split_sizes",
        MCORE,
        MCORE_VERIFIED,
        "platform/cpu.py",
        "moe_utils.maybe_move_tensor_to_cpu(tensor, as_numpy, record_stream), also bound in token_dispatcher",
    ),
    Workaround(
        "cpu_onednn_linear",
        MCORE,
        MCORE_VERIFIED,
        "platform/cpu.py",
        "tensor_parallel.layers.linear_with_grad_accumulation_and_async_allreduce's parameters, "
        "looked up by the linear layers' _forward_impl at call time",
    ),
    Workaround(
        "onednn_linear_op",
        TORCH,
        TORCH_VERIFIED,
        "platform/onednn_linear.py",
        "torch.ops.mkldnn._linear_pointwise(x, weight, bias, 'none', [], '') on dense fp32 tensors",
    ),
)
"""Every workaround of the project (the version check and the tests iterate over it)."""


def installed_versions() -> dict[str, str]:
    """Installed versions of the packages whose internals are touched (read from the package
    metadata, so megatron-core is not imported for it)."""
    return {pkg: metadata.version(pkg) for pkg in (MCORE, TORCH)}


def unverified(versions: dict[str, str]) -> list[Workaround]:
    """The workarounds whose verified range does not hold the given versions."""
    return [w for w in WORKAROUNDS if not w.holds_for(versions[w.package])]


def check_versions(versions: dict[str, str] | None = None) -> list[Workaround]:
    """Log one line about the installed versions; returns the unverified workarounds.

    All verified: one INFO line. Otherwise one WARNING line naming the installed versions and
    every workaround not verified on them (each has a test in tests/unit/test_compat.py that
    says whether its internal still behaves as relied on)."""
    versions = versions or installed_versions()
    found = ", ".join(f"{pkg} {v}" for pkg, v in versions.items())
    todo = unverified(versions)
    if not todo:
        logger.info("compat: %s; all %d workarounds verified on these versions", found, len(WORKAROUNDS))
    else:
        logger.warning(
            "compat: %s; unverified on these versions: %s (written for megatron-core "
            "%s, torch %s; run tests/unit/test_compat.py)",
            found,
            ", ".join(w.name for w in todo),
            MCORE_VERIFIED,
            TORCH_VERIFIED,
        )
    return todo


check_versions()
