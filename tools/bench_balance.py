#!/usr/bin/env python
"""How even the data-parallel ranks' modelled step FLOPs are, before and after balancing.

  python tools/bench_balance.py --data-path "0.2 /data/text 0.8 /data/vision" --dp 8 \
      --global-batch-size 256 --steps 20
  python tools/bench_balance.py --make-mix /tmp/balance_mix --rows 16000 --dp 8 --global-batch-size 256

For each of the first --steps global batches of the blend, the modelled FLOPs (ViT + projector +
LM per row, training/flops.py, for --recipe's model) of every data-parallel rank with the
contiguous split (``--no-balance-dp``) and with the trainer's balanced assignment
(training/balance.py). --make-mix builds a SAIL-VL-shaped blend first (bench/balance.py: 20%
text-only rows, images with a spread of tile grids from 1 to 13 tiles). Prints one JSON line,
then ``straggler_before=X straggler_after=Y``: the mean over steps of the busiest rank's FLOPs
over the mean rank's.
"""

from __future__ import annotations

import argparse
import json

from megatron_sail import cli
from megatron_sail.bench import balance


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    balance.add_arguments(p)
    a = p.parse_args(argv)
    if a.data_path:
        data_path = " ".join(a.data_path)
    elif a.make_mix:
        data_path = balance.write_mix(a.make_mix, a.rows)
    else:
        raise ValueError("give --data-path BLEND or --make-mix DIR")
    r = balance.measure(data_path, a.dp, a.global_batch_size, a.steps, a.recipe)
    print(json.dumps({"data_path": data_path, **r}))
    print(f"straggler_before={r['straggler_before']:.4f} straggler_after={r['straggler_after']:.4f}")
    return 0


if __name__ == "__main__":
    cli.run(main)
