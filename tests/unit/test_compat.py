"""One test per workaround of megatron_sail/compat (named ``test_<workaround>``): each fails when
the megatron-core / torch internal it relies on moved or behaves differently. After an
upgrade, the failing test names the workaround to revisit."""

import ast
import dataclasses
import inspect
import logging
import re
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megatron_sail import compat


def _order(source: str, *calls: str) -> list[int]:
    """Positions of the first occurrence of each call in ``source`` (-1 when missing)."""
    return [source.find(c) for c in calls]


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def _source_params(module, name: str) -> list[str]:
    """Parameters of the function ``name`` as ``module``'s source file defines it: the internal
    itself, even after platform/cpu.py replaced the module attribute with its CPU stand-in."""
    tree = ast.parse(inspect.getsource(module))
    [fn] = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name] or [None]
    assert fn is not None, f"{module.__name__} no longer defines {name}"
    return [a.arg for a in fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs]


# ---------------------------------------------------------------- the table and the check
def test_every_workaround_has_its_test():
    names = [w.name for w in compat.WORKAROUNDS]
    assert len(names) == len(set(names))
    missing = [n for n in names if f"test_{n}" not in globals()]
    assert not missing, f"workarounds without a test: {missing}"
    import os

    import megatron_sail

    pkg = os.path.dirname(megatron_sail.__file__)
    gone = [
        w.where
        for w in compat.WORKAROUNDS
        if w.where.startswith(("compat/", "platform/", "checkpoint/"))
        and not os.path.isfile(os.path.join(pkg, w.where))
    ]
    assert not gone, f"workarounds pointing at missing modules: {gone}"


def test_version_check_logs_one_line_naming_what_is_unverified(caplog):
    newer = {compat.MCORE: "0.17.0", compat.TORCH: "2.13.0+cpu"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # logging, not warnings.warn
        with caplog.at_level(logging.INFO, logger="megatron_sail.compat"):
            todo = compat.check_versions(newer)
    assert [w.package for w in todo] == [compat.MCORE] * len(todo)
    assert {w.name for w in todo} == {w.name for w in compat.WORKAROUNDS if w.package == compat.MCORE}
    [rec] = caplog.records
    assert rec.levelno == logging.WARNING
    line = rec.getMessage()
    assert "megatron-core 0.17.0" in line and "torch 2.13.0+cpu" in line
    assert "sharded_key_groups" in line and "wrapped_exception" not in line
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="megatron_sail.compat"):
        assert compat.check_versions({compat.MCORE: "0.16.1", compat.TORCH: "2.13.1"}) == []
    [rec] = caplog.records
    assert rec.levelno == logging.INFO and "all" in rec.getMessage()


def test_version_ranges_are_data():
    w = compat.Workaround("x", compat.TORCH, "==2.13.*", "compat/x.py", "x")
    assert w.holds_for("2.13.0+cpu") and w.holds_for("2.13.5") and not w.holds_for("2.14.0")
    installed = compat.installed_versions()
    assert set(installed) == {compat.MCORE, compat.TORCH}
    assert compat.check_versions(installed) == compat.unverified(installed)


# ---------------------------------------------------------------- dist_checkpointing
def test_sharded_key_groups():
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.strategies.torch import (
        _replace_state_dict_keys_with_sharded_keys as private,
    )

    from megatron_sail.compat.dist_checkpointing import sharded_key_groups

    assert _params(private) == ["sharded_state_dict", "keep_only_main_replica"]
    main = ShardedTensor.from_rank_offsets("layer.w", torch.zeros(2, 2))
    copy = ShardedTensor.from_rank_offsets("layer.w", torch.zeros(2, 2), replica_id=1)
    other = ShardedTensor.from_rank_offsets("layer.b", torch.zeros(2))
    sd = {"model": {"w": main, "w_copy": copy, "nested": {"b": other}}}
    assert len(private(sd, True)) == 3  # (groups, flat mapping, rename mapping)
    groups = sharded_key_groups(sd, keep_only_main_replica=True)
    assert set(groups) == {"layer.w", "layer.b"}
    assert groups["layer.w"] == [main] and groups["layer.b"] == [other]
    assert sharded_key_groups(sd, keep_only_main_replica=False)["layer.w"] == [main, copy]


def test_async_caller_hook():
    from megatron.core.dist_checkpointing.strategies.async_utils import (
        AsyncCaller,
        AsyncCallsQueue,
        AsyncRequest,
    )

    from megatron_sail.compat.dist_checkpointing import CallerQueue

    assert _params(AsyncCallsQueue._get_async_caller) == ["self"]
    assert "self._get_async_caller()" in inspect.getsource(AsyncCallsQueue.schedule_async_request)
    assert {"schedule_async_call", "is_current_async_call_done", "close"} <= AsyncCaller.__abstractmethods__

    class Recorder(AsyncCaller):
        def __init__(self):
            self.scheduled = []

        def schedule_async_call(self, async_req):
            self.scheduled.append(async_req)

        def is_current_async_call_done(self, blocking=False, no_dist=False):
            return True

        def close(self, abort=False):
            pass

        def __del__(self):
            pass

    class Queue(CallerQueue):
        caller_type = Recorder

    q = Queue()
    assert q.schedule_async_request(AsyncRequest(print, ("x",), [])) == 0
    [active] = q.async_calls
    assert isinstance(active.async_caller, Recorder)
    assert active.async_caller.scheduled[0].async_fn is print


def test_wrapped_exception():
    from torch.distributed.checkpoint.utils import _get_failure_dict

    from megatron_sail.compat.dist_checkpointing import wrapped_exception

    err = ValueError("disk full")
    failures = _get_failure_dict([[], wrapped_exception(err)])  # what Megatron's finalize reads
    assert list(failures) == [1] and failures[1][0] is err


def test_load_reader():
    from megatron.core.dist_checkpointing.strategies import torch as strategies

    from megatron_sail.compat.dist_checkpointing import DirectFileSystemReader, load_reader

    assert _params(strategies._get_filesystem_reader) == ["checkpoint_dir", "cache_metadata"]
    original = strategies._get_filesystem_reader
    with load_reader(DirectFileSystemReader):
        reader = strategies._get_filesystem_reader("/nowhere", cache_metadata=True)
        assert isinstance(reader, DirectFileSystemReader)
    assert strategies._get_filesystem_reader is original


def test_direct_read(tmp_path):
    import torch.distributed.checkpoint as dcp

    from megatron_sail.compat.dist_checkpointing import DirectFileSystemReader

    saved = {"w": torch.randn(6, 4), "h": torch.arange(8, dtype=torch.bfloat16), "t": torch.randn(3, 5)}
    dcp.save(saved, storage_writer=dcp.FileSystemWriter(str(tmp_path)), no_dist=True)
    reader = DirectFileSystemReader(str(tmp_path))
    info = next(iter(reader.read_metadata().storage_data.values()))
    assert {"relative_path", "offset", "length", "transform_descriptors"} <= {
        f.name for f in dataclasses.fields(info)
    }
    direct = []
    real = DirectFileSystemReader._direct

    def spy(self, *args):
        out = real(self, *args)
        direct.append(out is not None)
        return out

    DirectFileSystemReader._direct = spy
    try:
        out = {"w": torch.zeros(6, 4), "h": torch.zeros(8, dtype=torch.bfloat16), "t": torch.zeros(5, 3).t()}
        dcp.load(out, storage_reader=reader, no_dist=True)
    finally:
        DirectFileSystemReader._direct = real
    for key, value in saved.items():
        assert torch.equal(out[key], value), key
    assert sorted(direct) == [False, True, True]  # the transposed target goes through torch's path


def test_aligned_items(tmp_path):
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from torch.distributed.checkpoint import filesystem

    from megatron_sail.compat.dist_checkpointing import ITEM_ALIGN, DirectFileSystemReader, align_tensor_items

    assert _params(filesystem._write_item)[:4] == ["transforms", "stream", "data", "write_item"]
    align_tensor_items()  # installed on import of checkpoint/dcp.py; again is a no-op
    align_tensor_items()
    assert filesystem._write_item is filesystem_async._write_item
    assert not hasattr(filesystem._write_item.__wrapped__, "__wrapped__")  # wrapped once
    saved = {"a": torch.randn(3), "w": torch.randn(6, 4), "b": torch.randn(5), "obj": {"x": 1}}
    dcp.save(saved, storage_writer=dcp.FileSystemWriter(str(tmp_path)), no_dist=True)
    reader = DirectFileSystemReader(str(tmp_path))
    md = reader.read_metadata()
    tensor_items = [info for idx, info in md.storage_data.items() if idx.fqn in ("a", "w", "b")]
    assert len(tensor_items) == 3 and all(info.offset % ITEM_ALIGN == 0 for info in tensor_items)

    # mapped load: whole parameters become copy-on-write views of the file
    params = {k: torch.nn.Parameter(torch.zeros_like(saved[k])) for k in ("a", "w", "b")}
    reader = DirectFileSystemReader(str(tmp_path), share={p.data_ptr(): p for p in params.values()})
    out = {k: p.detach() for k, p in params.items()}
    dcp.load(out, storage_reader=reader, no_dist=True)
    assert reader.shared == {id(p) for p in params.values()}
    for key, p in params.items():
        assert torch.equal(p, saved[key]), key
        assert not torch.equal(out[key], saved[key]), key  # DCP's own target was not read into
    file_bytes = (tmp_path / "__0_0.distcp").read_bytes()
    with torch.no_grad():
        params["w"].add_(1.0)  # a write copies the page, never the file
    assert (tmp_path / "__0_0.distcp").read_bytes() == file_bytes


# ---------------------------------------------------------------- optimizer
def test_adam_step_on_load():
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from megatron_sail.compat.optimizer import keep_torch_adam_step

    private = DistributedOptimizer._set_main_param_and_optimizer_states
    assert _params(private) == ["self", "model_param", "tensors"]
    src = inspect.getsource(DistributedOptimizer)
    assert "self._set_main_param_and_optimizer_states(" in src  # looked up on the instance
    assert "self.model_param_group_index_map" in src
    p = torch.nn.Parameter(torch.ones(2))
    adam = torch.optim.Adam([p])
    adam.state[p]["step"] = torch.tensor(7.0)
    calls = []
    opt = SimpleNamespace(
        config=SimpleNamespace(),
        optimizer=adam,
        model_param_group_index_map={"mp": (0, 0)},
        _set_main_param_and_optimizer_states=lambda mp, t: calls.append((mp, t)),
    )
    keep_torch_adam_step(opt)
    opt._set_main_param_and_optimizer_states("mp", {"exp_avg": 1})
    assert calls == [("mp", {"exp_avg": 1, "step": adam.state[p]["step"]})]


def test_shared_adam_step():
    """torch's Adam increments a shared step tensor once per param (the bug); unsharing fixes it."""
    from megatron_sail.compat.optimizer import unshare_adam_steps

    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    adam = torch.optim.Adam([a, b], foreach=False)
    a.grad, b.grad = torch.ones(2), torch.ones(2)
    adam.step()
    shared = torch.tensor(1.0)
    adam.state[a]["step"] = adam.state[b]["step"] = shared
    adam.step()
    assert float(shared) == 3.0  # one step advanced the shared counter twice
    adam.state[a]["step"] = adam.state[b]["step"] = shared
    unshare_adam_steps(SimpleNamespace(optimizer=adam))
    assert adam.state[a]["step"] is not adam.state[b]["step"]
    adam.step()
    assert float(adam.state[a]["step"]) == float(adam.state[b]["step"]) == 4.0


def test_dummy_optimizer_states():
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from megatron_sail.compat.optimizer import can_init_dummy_states, init_dummy_states

    assert _params(DistributedOptimizer._init_optimizer_states_with_dummy_values) == ["self"]
    w = torch.nn.Parameter(torch.arange(4.0))
    adam = torch.optim.Adam([w], lr=0.0, weight_decay=0.0)
    opt = SimpleNamespace(optimizer=adam)
    opt._init_optimizer_states_with_dummy_values = (
        DistributedOptimizer._init_optimizer_states_with_dummy_values.__get__(opt)
    )
    assert can_init_dummy_states(opt) and not can_init_dummy_states(SimpleNamespace())
    init_dummy_states(opt)
    assert set(adam.state[w]) >= {"step", "exp_avg", "exp_avg_sq"}
    assert torch.equal(w.detach(), torch.arange(4.0)) and w.grad is None


def test_step_phases():
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
    from megatron.core.optimizer.optimizer import ChainedOptimizer, MegatronOptimizer

    for name in ("prepare_grads", "get_grad_norm", "step_with_ready_grads", "get_parameters"):
        assert callable(getattr(MegatronOptimizer, name)), name
    assert _params(clip_grad_by_total_norm_fp32)[:3] == ["parameters", "max_norm", "total_norm"]
    pos = _order(
        inspect.getsource(ChainedOptimizer.step),
        "self.prepare_grads()",
        "self.get_grad_norm()",
        "clip_grad_by_total_norm_fp32(",
        "self.step_with_ready_grads()",
    )
    assert -1 not in pos and pos == sorted(pos), pos


def test_chained_optimizer_layout():
    """What the resume path's layout fitting reads (EP=1 <-> EP>1: one optimizer vs a chain)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import ChainedOptimizer, param_group_identifier_keys

    assert "is_expert_parallel" in param_group_identifier_keys
    chained = inspect.getsource(ChainedOptimizer.sharded_state_dict)
    assert "if len(self.chained_optimizers) == 1:" in chained  # one: the single layout
    assert "sharded_state_dict[optimizer_idx] = optim_state_dict" in chained  # several: 0, 1, ...
    load = inspect.getsource(DistributedOptimizer.load_state_dict)
    assert 'state_dict["optimizer"]["param_groups"]' in load and 'f"pre_{key}"' in load


# ---------------------------------------------------------------- ddp
def test_param_gather_hooks():
    from megatron.core.distributed import DistributedDataParallel as DDP

    from megatron_sail.compat.ddp import pause_param_gather_hooks, resume_param_gather_hooks

    init = inspect.getsource(DDP.__init__)
    assert "self.use_forward_hook =" in init and "self.remove_forward_pre_hook_handles = {}" in init
    assert inspect.signature(DDP.disable_forward_pre_hook).parameters["param_sync"].default is True
    assert _params(DDP.enable_forward_pre_hook) == ["self"]
    assert "self.remove_forward_pre_hook_handles[module]" in inspect.getsource(DDP.enable_forward_pre_hook)

    class Chunk:
        def __init__(self, hooked):
            self.use_forward_hook = hooked
            self.remove_forward_pre_hook_handles = {"m": 1} if hooked else {}
            self.log = []

        def disable_forward_pre_hook(self, param_sync=True):
            self.log.append(("off", param_sync))

        def enable_forward_pre_hook(self):
            self.log.append("on")

    hooked, plain = Chunk(True), Chunk(False)
    paused = pause_param_gather_hooks([hooked, plain, torch.nn.Linear(1, 1)])
    assert paused == [hooked] and hooked.log == [("off", True)] and plain.log == []
    resume_param_gather_hooks(paused)
    assert hooked.log == [("off", True), "on"]


# ---------------------------------------------------------------- transformer_layer
def test_layer_bda_hooks():
    from megatron.core.transformer import transformer_layer

    from megatron_sail.compat.transformer_layer import replace_bias_dropout_add

    src = inspect.getsource(transformer_layer.TransformerLayer)
    for name in ("self_attn_bda", "mlp_bda"):
        assert f"self.{name} = build_module(submodules.{name})" in src, name
        assert f"self.{name}(self.training, self.config.bias_dropout_fusion)(" in src, name
    layer = SimpleNamespace()
    calls = []

    def branch(tag):
        return lambda training: (
            lambda owb, residual, prob: calls.append((tag, training, prob)) or residual + owb[0]
        )

    replace_bias_dropout_add(layer, branch("attn"), branch("mlp"))
    assert layer.self_attn_bda(True, True)((2, None), 1, 0.0) == 3
    assert layer.mlp_bda(False, False)((5, None), 1, 0.1) == 6
    assert calls == [("attn", True, 0.0), ("mlp", False, 0.1)]


def test_qkv_bias_off():
    import importlib.util

    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    from megatron_sail.compat.transformer_layer import drop_linear_bias

    assert "bias = self.bias if not self.skip_bias_add else None" in inspect.getsource(
        ColumnParallelLinear.forward
    )
    te_src = open(importlib.util.find_spec("megatron.core.extensions.transformer_engine").origin).read()
    assert "class TELayerNormColumnParallelLinear" in te_src and "self.use_bias" in te_src
    linear = torch.nn.Linear(3, 2)
    linear.use_bias = True
    drop_linear_bias(linear)
    assert linear.bias is None and linear.use_bias is False
    assert "bias" not in dict(linear.named_parameters())
    x = torch.randn(4, 3)
    torch.testing.assert_close(linear(x), x @ linear.weight.t())


# ---------------------------------------------------------------- inference's module swaps
def test_core_attention_swap():
    from megatron.core.transformer import attention

    from megatron_sail.inference.kv_cache import CachedAttention

    src = inspect.getsource(attention.Attention)
    assert "self.core_attention = submodules.core_attention(" in src
    call = re.search(r"apply_module\(self\.core_attention\)\(([^)]*)\)", src)
    assert call, "Attention no longer calls its core_attention through apply_module"
    args = [a.strip() for a in call.group(1).split(",") if a.strip()]
    assert args == [
        "query",
        "key",
        "value",
        "attention_mask",
        "attn_mask_type=attn_mask_type",
        "attention_bias=attention_bias",
        "packed_seq_params=packed_seq_params",
    ]
    ours = _params(CachedAttention.forward)[1:]
    assert ours == [
        "query",
        "key",
        "value",
        "attention_mask",
        "attn_mask_type",
        "attention_bias",
        "packed_seq_params",
    ]


def test_plain_parallel_layers():
    from megatron.core.tensor_parallel import layers

    col, row = layers.ColumnParallelLinear, layers.RowParallelLinear
    assert _params(col.forward)[:4] == ["self", "input_", "weight", "runtime_gather_output"]
    assert _params(row.forward) == ["self", "input_"]
    assert _params(layers.VocabParallelEmbedding.forward) == ["self", "input_"]
    for cls in (col, row):
        src = inspect.getsource(cls)
        assert "self.skip_bias_add = skip_bias_add" in src and "self.tp_group" in src, cls.__name__
        fwd = inspect.getsource(cls.forward)
        assert "return output, output_bias" in fwd and "self.skip_bias_add" in fwd, cls.__name__
    # the bias is returned apart exactly when skip_bias_add (else added, None returned)
    assert "output_bias = self.bias if self.skip_bias_add else None" in inspect.getsource(col.forward)
    row_fwd = inspect.getsource(row.forward)
    assert "if not self.skip_bias_add:" in row_fwd and "output_bias = None" in row_fwd
    emb = inspect.getsource(layers.VocabParallelEmbedding)
    assert "self.reduce_scatter_embeddings = reduce_scatter_embeddings" in emb


# ---------------------------------------------------------------- moe
def test_router_gemm_without_te():
    from megatron.core.transformer.moe import moe_utils

    from megatron_sail.compat.moe import ensure_router_gemm_fallback

    assert "te_general_gemm is not None" in inspect.getsource(moe_utils.RouterGatingLinearFunction)
    ensure_router_gemm_fallback()
    if not moe_utils.HAVE_TE:
        assert moe_utils.te_general_gemm is None
        inp, weight = torch.randn(3, 4), torch.randn(5, 4)
        out = moe_utils.router_gating_linear(inp, weight, None, torch.float32)
        torch.testing.assert_close(out, inp @ weight.t())


# ---------------------------------------------------------------- indexed
def test_idx_format(tmp_path):
    from megatron.core.datasets import indexed_dataset as mid

    from megatron_sail.compat import indexed

    assert mid._INDEX_HEADER == indexed.MAGIC
    for dtype, code in indexed.DTYPE_CODES.items():
        assert mid.DType.code_from_dtype(dtype.type) == code
    prefix = str(tmp_path / "ds")
    builder = mid.IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for doc in ([[1, 2, 3], [4]], [[5, 6]]):
        for seq in doc:
            builder.add_item(torch.tensor(seq, dtype=torch.int32))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    with open(prefix + ".idx", "rb") as f:
        h = indexed.parse_header(f.read(indexed.HEADER_BYTES))
        assert indexed.read_document_index(f, h.documents_offset) == 0
        last = indexed.read_document_index(f, h.file_bytes - indexed.DOCUMENT_BYTES)
    ds = mid.IndexedDataset(prefix)
    assert (h.magic, h.version, h.dtype_code) == (indexed.MAGIC, indexed.VERSION, 4)
    with open(prefix + ".idx", "rb") as f:
        assert f.read(indexed.HEADER_BYTES) == indexed.pack_header(np.int32, h.sequences, h.documents)
    assert (h.sequences, h.documents) == (len(ds), len(ds.document_indices)) == (3, 3)
    assert h.file_bytes == (tmp_path / "ds.idx").stat().st_size
    assert last == h.sequences == ds.document_indices[-1]
    np.testing.assert_array_equal(ds.index.sequence_lengths, [3, 1, 2])


# ---------------------------------------------------------------- platform/cpu.py
def test_cpu_rng_tracker():
    from megatron.core.tensor_parallel import random as mrandom

    assert _source_params(mrandom, "_get_cuda_rng_state")[:1] == ["device"]
    assert "new_state" in _source_params(mrandom, "_set_cuda_rng_state")
    fork = inspect.getsource(mrandom.CudaRNGStatesTracker.fork)
    # the tracker reads the module globals at call time, so patching the module reaches it
    assert re.search(r"\b_get_cuda_rng_state\(", fork) and re.search(r"\b_set_cuda_rng_state\(", fork)


def test_cpu_moe_split_sizes():
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    assert _source_params(moe_utils, "maybe_move_tensor_to_cpu") == ["tensor", "as_numpy", "record_stream"]
    assert hasattr(token_dispatcher, "maybe_move_tensor_to_cpu")  # bound there by name too
    src = inspect.getsource(token_dispatcher)
    assert "maybe_move_tensor_to_cpu(" in src and "as_numpy=True" in src


def test_cpu_onednn_linear():
    from megatron.core.tensor_parallel import layers

    assert _source_params(layers, "linear_with_grad_accumulation_and_async_allreduce") == [
        "input",
        "weight",
        "bias",
        "gradient_accumulation_fusion",
        "allreduce_dgrad",
        "sequence_parallel",
        "grad_output_buffer",
        "wgrad_deferral_limit",
        "async_grad_allreduce",
        "tp_group",
    ]
    # it reads and sets a flag on itself through its module global (the wrapper carries it)
    assert "linear_with_grad_accumulation_and_async_allreduce.warned" in inspect.getsource(layers)
    for cls in (layers.ColumnParallelLinear, layers.RowParallelLinear):  # a global lookup per call
        assert "return linear_with_grad_accumulation_and_async_allreduce(" in inspect.getsource(
            cls._forward_impl
        )


def test_onednn_linear_op():
    from megatron_sail.platform import onednn_linear

    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch built without oneDNN")
    g = torch.Generator().manual_seed(0)
    x, w, b = (
        torch.randn(3, 5, 16, generator=g),
        torch.randn(24, 16, generator=g),
        torch.randn(24, generator=g),
    )
    assert onednn_linear.available()
    y = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    torch.testing.assert_close(y, x @ w.t() + b, rtol=1e-5, atol=1e-5)


def test_te_choice_lives_below_the_models():
    """layer_specs asks compat/te.py (no import of platform/); without CUDA TE is never chosen."""
    from megatron_sail.compat.te import te_available
    from megatron_sail.models import layer_specs

    assert layer_specs.te_available is te_available
    if not torch.cuda.is_available():
        assert te_available() is False
    src = inspect.getsource(layer_specs)
    assert "megatron_sail.platform" not in src


# ---------------------------------------------------------------- the seam holds
def _private_names(folder: str, pattern: str) -> set[str]:
    """Underscored names that ``folder``'s sources define (functions, classes, attributes)."""
    import os

    names = set()
    for dirpath, _, files in os.walk(folder):
        for f in files:
            if f.endswith(".py"):
                with open(os.path.join(dirpath, f), encoding="utf-8", errors="ignore") as fh:
                    names |= set(re.findall(pattern, fh.read(), re.M))
    return names


def test_no_private_megatron_names_outside_compat_and_platform():
    """Outside compat/ and platform/: no underscored name imported from megatron/torch, no
    override of a megatron class's private method, no private megatron attribute touched."""
    import os

    import megatron.core

    import megatron_sail

    defined = r"(?:def|class)\s+(_[a-z]\w*)|self\.(_[a-z]\w*)\s*[:=]|^(_[a-z]\w*)\s*[:=]"
    flat = lambda groups: {n for g in groups for n in (g if isinstance(g, tuple) else (g,)) if n}  # noqa: E731
    pkg = os.path.dirname(megatron_sail.__file__)
    theirs = flat(_private_names(os.path.dirname(megatron.core.__file__), defined))
    ours = flat(_private_names(pkg, defined))
    private = lambda n: n.startswith("_") and not n.startswith("__")  # noqa: E731
    hits = []
    for dirpath, _, files in os.walk(pkg):
        if os.path.relpath(dirpath, pkg).split(os.sep)[0] in ("compat", "platform"):
            continue
        for f in (f for f in files if f.endswith(".py")):
            path = os.path.join(dirpath, f)
            with open(path, encoding="utf-8") as fh:
                tree = ast.parse(fh.read())
            mcore = {
                a.asname or a.name
                for n in ast.walk(tree)
                if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("megatron")
                for a in n.names
            }
            for n in ast.walk(tree):
                where = f"{os.path.relpath(path, pkg)}:{getattr(n, 'lineno', 0)}"
                if isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] in ("megatron", "torch"):
                    hits += [f"{where} imports {a.name}" for a in n.names if private(a.name)]
                elif isinstance(n, ast.ClassDef) and any(
                    isinstance(b, ast.Name) and b.id in mcore for b in n.bases
                ):
                    hits += [
                        f"{where} overrides {d.name}"
                        for d in n.body
                        if isinstance(d, ast.FunctionDef) and private(d.name) and d.name in theirs
                    ]
                elif isinstance(n, ast.Attribute) and private(n.attr) and n.attr in theirs - ours:
                    hits.append(f"{where} touches .{n.attr}")
    assert not hits, hits
