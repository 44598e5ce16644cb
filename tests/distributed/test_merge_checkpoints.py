"""tools/merge_checkpoints.py (model soup): the weighted mean of every tensor, inputs saved at
different TP layouts, and refusals that name the tensor / field / tokenizer entry.

Two tiny random InternVL checkpoints (same tokenizer, different seeds) are converted to Megatron;
one of them is re-saved at TP=2 by two gloo ranks, so the soup reads one TP=1 and one TP=2 input.
The merge runs in a spawned process (it starts Megatron's groups; the pytest process stays clean).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from launcher import launch


def _convert(rank, hf_dirs, outs):
    """Rank 0 of 1: hf-to-mcore each folder."""
    from megatron_sail.convert.checkpoint import hf_to_mcore

    for src, out in zip(hf_dirs, outs):
        hf_to_mcore(src, out)
    return True


def _resave_tp2(rank, src, out):
    """Two ranks: load a converted checkpoint at TP=2 and save it again (TP-sharded)."""
    import torch as t

    t.set_num_threads(1)
    from megatron_sail.checkpoint import dcp as dist_ckpt
    from megatron_sail.checkpoint import integrity
    from megatron_sail.checkpoint.layout import read_model_config
    from megatron_sail.config.parallel import ParallelConfig
    from megatron_sail.convert.checkpoint import build_model_chunks
    from megatron_sail.platform import distributed

    parallel = ParallelConfig(tp=2)
    distributed.initialize(parallel)
    chunks = build_model_chunks(read_model_config(src), parallel, use_te=False)
    dist_ckpt.load_model(chunks, src)
    dist_ckpt.save_model(chunks, out)
    if rank == 0:
        for name in ("model_config.yaml", "processor.json"):
            shutil.copy2(Path(src) / name, Path(out) / name)
        shutil.copytree(Path(src) / "tokenizer", Path(out) / "tokenizer")
    t.distributed.barrier()
    integrity.write_manifest(out)  # last, as every writer does: the side files are listed too
    return True


def _merge(rank, argvs):
    """Run the tool's main once per argv in this (spawned) process; the error texts (None for
    a merge that succeeded)."""
    import merge_checkpoints as tool

    out = []
    for argv in argvs:
        try:
            tool.main(argv)
            out.append(None)
        except (ValueError, FileExistsError, FileNotFoundError) as e:
            out.append(f"{type(e).__name__}: {e}")
    return out


def _plain(path, tmp: Path) -> dict:
    """Every float tensor of a dist checkpoint, full, by global key (DCP's own reader, no
    process group needed)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{Path(path).name}.pt"
    dcp_to_torch_save(str(path), str(out))
    state = torch.load(out, weights_only=False)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and torch.is_floating_point(v)}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Converted checkpoints a (TP=1), b (re-saved at TP=2) and c (another vocabulary)."""
    root = tmp_path_factory.mktemp("soup")
    import make_tiny_hf_checkpoint as tiny

    hf = [
        tiny.make_tiny_checkpoint(
            root / f"hf{k}", tiny.TinyCheckpointConfig(layout="hf", vocab_size=300, tokenizer=True, seed=s)
        )
        for k, s in ((0, 3), (1, 4))
    ]
    hf.append(
        tiny.make_tiny_checkpoint(
            root / "hf2", tiny.TinyCheckpointConfig(layout="hf", vocab_size=384, tokenizer=True, seed=5)
        )
    )
    mc = [str(root / n) for n in ("a", "b1", "c")]
    launch(_convert, 1, [str(h) for h in hf], mc, timeout=300)
    launch(_resave_tp2, 2, mc[1], str(root / "b"), timeout=300)
    return root, str(root / "a"), str(root / "b"), str(root / "c")


def test_soup_is_the_weighted_mean_of_inputs_saved_at_tp1_and_tp2(inputs, tmp_path):
    root, a, b, _ = inputs
    out = root / "soup"
    [[err]] = launch(_merge, 1, [["--inputs", a, b, "--weights", "3", "1", "--out", str(out)]])
    assert err is None, err
    ta, tb, ts = _plain(a, tmp_path), _plain(b, tmp_path), _plain(out, tmp_path)
    assert sorted(ts) == sorted(ta) == sorted(tb)
    differing = 0
    for key in ta:
        want = 0.75 * ta[key].double() + 0.25 * tb[key].double()
        torch.testing.assert_close(ts[key].double(), want, rtol=0, atol=1e-6, msg=key)
        differing += int(not torch.equal(ta[key], tb[key]))
    assert differing > len(ta) // 2  # the inputs really differ: the mean is not a copy
    assert (out / "tokenizer").is_dir() and (out / "model_config.yaml").is_file()
    assert (out / "manifest.json").is_file() and (out / "soup.json").is_file()
    assert not [p for p in root.iterdir() if ".soup.tmp" in p.name]


def test_soup_refuses_mismatches_naming_them(inputs, tmp_path):
    root, a, b, c = inputs
    forged = tmp_path / "forged"  # same config file, other tensor shapes (a hand-edited config)
    shutil.copytree(c, forged)
    shutil.copy2(Path(a) / "model_config.yaml", forged / "model_config.yaml")
    other_tok = tmp_path / "other_tok"  # same weights, another tokenizer file
    shutil.copytree(b, other_tok)
    vocab = next(p for p in sorted((other_tok / "tokenizer").iterdir()) if p.suffix == ".json")
    vocab.write_text(vocab.read_text() + " ")
    [errs] = launch(
        _merge,
        1,
        [
            ["--inputs", a, c, "--out", str(tmp_path / "x")],
            ["--inputs", a, str(forged), "--out", str(tmp_path / "y")],
            ["--inputs", a, str(other_tok), "--out", str(tmp_path / "z")],
            ["--inputs", a, b, "--weights", "1", "--out", str(tmp_path / "w")],
        ],
    )
    assert errs[0] and "vocab_size" in errs[0], errs[0]  # the config field is named
    assert errs[1] and "tensor language_model.embedding.word_embeddings.weight" in errs[1], errs[1]
    assert errs[2] and "tokenizer differs" in errs[2], errs[2]
    assert errs[3] and "2 inputs" in errs[3], errs[3]
    assert not any((tmp_path / n).exists() for n in "xyzw")
