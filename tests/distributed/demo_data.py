"""The small demo dataset the trainer tests run on: generated, then preprocessed to the tiny
recipe's geometry (32 px tiles, 4 tokens per tile, at most 4 tiles, 256-token rows)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def make_tiny_demo(out: Path, env: dict, splits=("train", "val"), samples: int = 120) -> dict:
    """Write the demo set under ``out``; returns {split: dataset prefix}."""
    py = [sys.executable, "-W", "ignore"]
    subprocess.run(py + ["tools/make_demo_data.py", "--out", str(out / "raw"), "--samples",
                         str(samples)], cwd=ROOT, env=env, check=True, capture_output=True)
    prefixes = {}
    for split in splits:
        prefixes[split] = str(out / split)
        subprocess.run(py + ["tools/preprocess_data.py", "--input", str(out / "raw" / f"{split}.jsonl"),
                             "--tokenizer", str(out / "raw" / "tokenizer.json"),
                             "--output-prefix", prefixes[split], "--seq-length", "256",
                             "--recipe", "tiny", "--max-tiles", "4"],  # 32 px tiles, 4 tokens
                       cwd=ROOT, env=env, check=True, capture_output=True)
    return prefixes
