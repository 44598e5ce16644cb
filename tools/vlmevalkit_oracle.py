#!/usr/bin/env python
"""Regenerate the VLMEvalKit oracle fixtures of tests/unit/test_eval_vlmevalkit.py.

NOT part of the project's environment: run it with a separate Python that has VLMEvalKit's
checkout and its scoring dependencies, never with the project's .venv (see
tests/unit/fixtures/vlmevalkit/regenerate.md):

  python tools/vlmevalkit_oracle.py --vlmevalkit /path/to/VLMEvalKit

For every case of tests/unit/fixtures/vlmevalkit/cases.json it writes, next to cases.json:
  DATASET.tsv        the benchmark file (the case's columns plus a tiny base64 image), as
                     pandas writes a VLMEvalKit benchmark TSV;
  DATASET_pred.xlsx  the predictions file as VLMEvalKit's inference writes it (its own
  DATASET_pred.tsv   dataset loader, ``prediction`` added, ``image`` dropped, its own ``dump``);
  DATASET_ours.tsv   the same predictions as tools/evaluate.py writes them;
and expected.json: the scores VLMEvalKit's unmodified ``evaluate`` (judge ``exact_matching``)
computes from each of the three predictions files (they must agree, so VLMEvalKit reads our
files as its own), per-item verdicts, and VLMEvalKit's commit hash.

Only VLMEvalKit's package ``__init__`` files are bypassed (they import every model and
dataset, with torch and dozens of optional dependencies); the dataset classes, their
``evaluate`` and every scoring helper run as VLMEvalKit ships them.
"""

from __future__ import annotations

import argparse
import ast
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import types

HERE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "unit", "fixtures", "vlmevalkit"
)
OUT = HERE
"""Where the files are written (--out; the fixtures folder by default)."""
# a 1x1 white PNG: VLMEvalKit drops rows without an image, and longer than 64 characters,
# so it is an image and not a reference to another row's index
TINY_PNG = base64.b64encode(
    bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c4944415408d7"
        "63f8ffff3f0005fe02fea7a6d6d70000000049454e44ae426082"
    )
).decode()


def import_vlmevalkit(root: str) -> dict:
    """VLMEvalKit's dataset classes, its package __init__ files bypassed."""

    def package(name: str, path: str) -> types.ModuleType:
        mod = types.ModuleType(name)
        mod.__path__ = [path]
        sys.modules[name] = mod
        return mod

    package("vlmeval", os.path.join(root, "vlmeval"))
    package("vlmeval.dataset", os.path.join(root, "vlmeval", "dataset"))
    utils = package("vlmeval.dataset.utils", os.path.join(root, "vlmeval", "dataset", "utils"))
    from vlmeval.dataset.utils.judge_util import DEBUG_MESSAGE, build_judge

    utils.DEBUG_MESSAGE, utils.build_judge = DEBUG_MESSAGE, build_judge
    from vlmeval.dataset import image_mcq, image_vqa, image_yorn

    return {
        "ImageYORNDataset": image_yorn.ImageYORNDataset,
        "ImageMCQDataset": image_mcq.ImageMCQDataset,
        "MMMUDataset": image_mcq.MMMUDataset,
        "CustomMCQDataset": image_mcq.CustomMCQDataset,
        "ImageVQADataset": image_vqa.ImageVQADataset,
        "OCRBench": image_vqa.OCRBench,
    }


def local_dataset(cls, tsv: str, name: str):
    """The VLMEvalKit dataset ``name`` of class ``cls`` built from our TSV (no download)."""
    from vlmeval.smp import load

    local = type(f"Local{cls.__name__}", (cls,), {"load_data": lambda self, dataset: load(tsv)})
    return local(dataset=name)


def write_files(case: dict, classes: dict) -> tuple[object, dict]:
    """The benchmark TSV and the two predictions files of one case."""
    import pandas as pd
    from vlmeval.smp import dump

    name = case["dataset"]
    bench = pd.DataFrame([{c: r[c] for c in case["columns"]} for r in case["rows"]])
    bench.insert(1, "image", TINY_PNG)
    tsv = os.path.join(OUT, f"{name}.tsv")
    bench.to_csv(tsv, sep="\t", index=False)
    ds = local_dataset(classes[case["class"]], tsv, name)
    preds = {str(r["index"]): r["prediction"] for r in case["rows"]}
    drop = {str(i) for i in case["drop_from_predictions"]}
    data = ds.data.copy()
    data = data[[str(x) not in drop for x in data["index"]]]
    # what vlmeval/inference.py's infer_data_job does with the model's answers
    data["prediction"] = [str(preds[str(x)]) for x in data["index"]]
    if "image" in data:
        data.pop("image")
    files = {}
    for fmt in ("xlsx", "tsv"):
        files[fmt] = os.path.join(OUT, f"{name}_pred.{fmt}")
        dump(data, files[fmt])
    files["ours"] = write_ours(tsv, name, preds, drop)
    return ds, files


def write_ours(tsv: str, name: str, preds: dict, drop: set) -> str:
    """The same predictions as tools/evaluate.py writes them (megatron_sail/eval/tsv.py, plain
    Python): VLMEvalKit must read and score that file as it scores its own."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from megatron_sail.eval.tsv import read_items, read_rows, write_predictions

    header, _ = read_rows(tsv)
    items = [it for it in read_items(tsv, need_images=False) if it.index not in drop]
    path = os.path.join(OUT, f"{name}_ours.tsv")
    write_predictions(path, header, items, preds)
    return path


def _number(v):
    """A float, or None for NaN (a category absent from a split)."""
    v = float(v)
    return None if v != v else v


def _frame(df) -> dict:
    """A result DataFrame as {row label: {column: value}} (the label is its 'split' cell)."""
    out = {}
    for i in range(len(df)):
        row = df.iloc[i].to_dict()
        label = str(row.pop("split", "Overall"))
        out[label] = {str(k): _number(v) for k, v in row.items()}
    return out


def _items_vqa(result_file: str, dataset: str) -> dict:
    """Per-item value (VLMEvalKit's hit_calculate of each row's matches)."""
    from vlmeval.dataset.utils.vqa_eval import hit_calculate
    from vlmeval.smp import load

    data = load(result_file)
    out = {}
    for idx, match in zip(data["index"], data["eval_match"]):
        m = ast.literal_eval(match) if isinstance(match, str) else match
        out[str(idx)] = float(hit_calculate([{"match": m}], dataset)[0])
    return out


def _items_ocrbench(classes: dict, data, work: str, fmt: str, total: float) -> dict:
    """Per-item verdicts of OCRBench, which reports only counts: an item is right when making
    its prediction wrong ('~') lowers the count. (Scoring one-row files instead would let pandas
    read a lone prediction such as '0123.' as the number 123.0.)"""
    from vlmeval.smp import dump

    out = {}
    for i in range(len(data)):
        changed = data.copy()
        changed.loc[changed.index[i], "prediction"] = "~"
        path = os.path.join(work, f"without_{i}.{fmt}")
        dump(changed, path)
        out[str(data.iloc[i]["index"])] = float(total - cls_eval(classes, path)["Final Score"])
    return out


def evaluate(ds, case: dict, pred_file: str, fmt: str, classes: dict) -> dict:
    """VLMEvalKit's scores of one predictions file, evaluated in a scratch folder."""
    from vlmeval.smp import load

    work = tempfile.mkdtemp(prefix="vlmk_oracle_")
    try:
        os.environ["PRED_FORMAT"] = fmt
        f = os.path.join(work, os.path.basename(pred_file))
        shutil.copy(pred_file, f)
        stem = f.rsplit(".", 1)[0]
        res = ds.evaluate(f, model="exact_matching", nproc=1)
        name, cls = case["dataset"], case["class"]
        if cls == "ImageYORNDataset":
            aux = load(f"{stem}_auxmatch.{fmt}")
            items = {
                str(i): {"extracted": e, "score": bool(s)}
                for i, e, s in zip(aux["index"], aux["extracted"], aux["score"])
            }
            if "MME" in name:
                metrics = {str(k): float(v) for k, v in res.iloc[0].to_dict().items()}
                headline = metrics["perception"] + metrics["reasoning"]
            else:
                metrics = _frame(res)
                o = metrics["Overall"]
                headline = o["Overall"] if "POPE" in name else (o["aAcc"] + o["fAcc"] + o["qAcc"]) / 3
        elif cls == "OCRBench":
            metrics = {k: float(v) for k, v in res.items()}
            headline = metrics["Final Score"]
            items = _items_ocrbench(classes, load(f), work, fmt, metrics["Final Score"])
        elif cls == "ImageVQADataset":
            metrics = {str(k): float(v) for k, v in res.iloc[0].to_dict().items()}
            headline = metrics["Overall"]
            items = _items_vqa(f"{stem}_results.{fmt}", name)
        else:
            metrics = _frame(res)
            headline = 100 * (
                metrics["validation"]["Overall"] if "MMMU" in name else metrics["none"]["Overall"]
            )
            result = load(f"{stem}_exact_matching_result.{fmt}")
            items = {str(i): int(h) for i, h in zip(result["index"], result["hit"])}
        return {"headline": float(headline), "metrics": metrics, "items": items}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def cls_eval(classes: dict, path: str) -> dict:
    """OCRBench.evaluate is a classmethod: scores of one file."""
    return classes["OCRBench"].evaluate(path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vlmevalkit", required=True, help="VLMEvalKit checkout (its git work tree)")
    p.add_argument("--out", default=HERE, help="folder for the files (default: the fixtures)")
    a = p.parse_args()
    global OUT
    OUT = os.path.abspath(a.out)
    os.makedirs(OUT, exist_ok=True)
    root = os.path.abspath(a.vlmevalkit)
    os.environ.setdefault("LMUData", tempfile.mkdtemp(prefix="lmudata_"))
    sys.path.insert(0, root)
    classes = import_vlmevalkit(root)
    with open(os.path.join(HERE, "cases.json")) as f:
        cases = json.load(f)["cases"]
    try:
        commit = subprocess.run(
            ["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = os.environ.get("VLMEVALKIT_COMMIT", "unknown")
    import numpy
    import openpyxl
    import pandas

    out = {
        "vlmevalkit_commit": commit,
        "versions": {
            "python": sys.version.split()[0],
            "pandas": pandas.__version__,
            "numpy": numpy.__version__,
            "openpyxl": openpyxl.__version__,
        },
        "cases": {},
    }
    for case in cases:
        ds, files = write_files(case, classes)
        got = {
            fmt: evaluate(ds, case, path, "xlsx" if fmt == "xlsx" else "tsv", classes)
            for fmt, path in files.items()
        }
        for fmt in ("tsv", "ours"):
            if json.dumps(got["xlsx"], sort_keys=True) != json.dumps(got[fmt], sort_keys=True):
                raise SystemExit(
                    f"{case['dataset']}: VLMEvalKit scores {files[fmt]} and "
                    f"{files['xlsx']} differently:\n{got}"
                )
        out["cases"][case["dataset"]] = {"ours": case["ours"], **got["xlsx"]}
        print(f"{case['dataset']:20s} {case['ours']:15s} {got['xlsx']['headline']:.4f}")
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
