r"""Input-pipeline throughput per config: batches/s, examples/s, tokens/s.

  python benchmarks/data_throughput.py                       # all configs below
  python benchmarks/data_throughput.py --configs configs/bert.py:tiny --batches 1000

For each config it builds the training pipeline exactly as training does (default
corpus, tokenizer from the cache, background prefetch thread), pulls `--warmup`
batches (start-up, first tokenization of the corpus, prefetch buffers), then times
`--batches` more. Prints a markdown table, then one JSON line per config. Results and
the machine they came from are recorded in benchmarks/data_throughput.md.

The pipeline must produce batches faster than the model consumes them: compare
batches/s here with the train step rate of the same config on the same machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from configs.common import load_config  # noqa: E402
from unit_scaling.data import pipeline, stats  # noqa: E402

DEFAULT_CONFIGS = (
    "configs/bert.py:tiny",
    "configs/bert.py:mini",
    "configs/causal_lm.py:tiny",
    "configs/causal_lm.py:125m",
)



def bench(name: str, warmup: int, batches: int) -> dict:
    """Throughput of the training pipeline of config `name`."""
    config = load_config(name)
    start = time.perf_counter()
    iterator, info = pipeline.make_pretraining_pipeline(
        config, "train", process_index=0, process_count=1
    )
    setup_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(warmup):
        next(iterator)
    warmup_s = time.perf_counter() - start
    result, _ = stats.measure(iterator, info.objective, batches)
    iterator.close()
    del iterator
    gc.collect()
    result.update(
        config=name,
        setup_s=setup_s,
        warmup_s=warmup_s,
        warmup_batches=warmup,
        tokenizer_pieces=info.tokenizer.vocab_size,
    )
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--batches", type=int, default=500)
    args = parser.parse_args()
    rows = []
    for name in args.configs:
        # Big configs make big batches: scale the counts so each config runs for seconds.
        config = load_config(name)
        scale = max(1, (config.train.global_batch_size * config.data.seq_len) // (32 * 128))
        rows.append(bench(name, max(2, args.warmup // scale), max(5, args.batches // scale)))
        print(f"{name}: {rows[-1]['batches_per_s']:.1f} batches/s", file=sys.stderr, flush=True)
    print(f"cpu cores: {os.cpu_count()}, load average: {os.getloadavg()[0]:.2f}\n")
    print("| config | batch x seq_len | batches/s | examples/s | tokens/s | warm-up s | setup s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['config']} | {r['batch_size']} x {r['seq_len']} | {r['batches_per_s']:.1f} | "
            f"{r['examples_per_s']:.0f} | {r['tokens_per_s']:.0f} | {r['warmup_s']:.2f} | "
            f"{r['setup_s']:.2f} |"
        )
    for r in rows:
        print(
            json.dumps(
                {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()},
                sort_keys=True,
            )
        )


if __name__ == "__main__":
    main()
