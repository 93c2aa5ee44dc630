"""Plain helpers shared by several test files: no test file imports another.

- The small data configs of the data tests: `SMALL_CORPUS`, `small_bert_config`,
  `small_causal_config`, `take`, `batches_equal`. Their tokenizers are trained once per
  process (conftest points the cache at a temporary directory of the process) on two KJV
  books with a 1000-piece vocabulary: small enough to keep the whole data suite fast.

Importing this module sets up nothing: the tests get their 8 CPU devices from
conftest.py.
"""

import numpy as np

from configs.common import load_config

# ------------------------------------------------------------------- data configs

SMALL_CORPUS = "kjv:Genesis+Matthew"  # 78 chapters, 2,604 verses


def small_bert_config(**data_overrides):
    """configs/bert.py:tiny,param=sp (BERT's own architecture; tests set `param`
    afterwards) on SMALL_CORPUS, vocab 1000 (BPE), seq_len 64, batch 16."""
    config = load_config("configs/bert.py:tiny,param=sp")
    config.data.corpus = SMALL_CORPUS
    config.data.tokenizer = "bpe"
    config.data.vocab_size = 1000
    config.data.seq_len = 64
    config.data.max_predictions_per_seq = 10
    config.data.shuffle_window = 16
    config.train.global_batch_size = 16
    config.data.update(data_overrides)
    return config


def small_causal_config(**data_overrides):
    """configs/causal_lm.py:tiny on SMALL_CORPUS, vocab 1000 (BPE), seq_len 64, batch 8."""
    config = load_config("configs/causal_lm.py:tiny")
    config.data.corpus = SMALL_CORPUS
    config.data.vocab_size = 1000
    config.data.seq_len = 64
    config.data.shuffle_window = 16
    config.data.num_packing_bins = 16
    config.train.global_batch_size = 8
    config.data.update(data_overrides)
    return config


def take(iterator, n):
    """The next `n` batches of `iterator`, as a list."""
    return [next(iterator) for _ in range(n)]


def batches_equal(a, b) -> bool:
    """Whether two lists of batches (dicts of arrays) are identical."""
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b)
    )
