"""Plain helpers shared by several test files: no test file imports another.

- The small data configs of the data tests: `SMALL_CORPUS`, `small_bert_config`,
  `small_causal_config`, `take`, `batches_equal`. Their tokenizers are trained once per
  process (conftest points the cache at a temporary directory of the process) on two KJV
  books with a 1000-piece vocabulary: small enough to keep the whole data suite fast.
- The tiny end-to-end models on that data: `SMALL_MODEL`, `tiny`, and the one-call
  `run` through `loop.run`; the same data and model as command-line overrides:
  `DATA_FLAGS`, `BERT_FLAGS`, `CAUSAL_FLAGS`, `SMALL_MODEL_FLAGS`.
- The toy training loop: `train_config`, the `Toy` model, its `Batches`,
  `toy_loop_config` and `make_task_factory`.

Importing this module sets up nothing: the tests get their 8 CPU devices from
conftest.py; tests/golden_spread.py and tests/multihost_worker.py set up their own.
"""

import os
import signal

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs.common import load_config
from unit_scaling.train import loop, metrics, tasks

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


# -------------------------------------------------------------- tiny end-to-end models

SMALL_MODEL = dict(d_model=32, num_layers=2, num_heads=2, mlp_dim=64)


def tiny(objective="mlm_nsp", param="umup", steps=20, **train):
    config = small_bert_config() if objective == "mlm_nsp" else small_causal_config()
    config.param = param
    config.model.update(SMALL_MODEL, dropout=0.0, attention_dropout=0.0)
    if objective == "mlm_nsp":
        config.model.max_len = 64
    config.train.update(dict(steps=steps, log_every=1, eval_every=0, checkpoint_every=0,
                             keep_checkpoints=2, lr={"sp": 3e-3, "unit": 3e-2, "umup": 1.0}[param],
                             grad_clip=1.0 if param == "sp" else 0.0), **train)
    return config


def run(config, workdir):
    loop.run(config, str(workdir))
    return metrics.read_metrics(str(workdir))


# The data of small_*_config (its tokenizer is shared) and the model of `tiny`, as
# command-line overrides.
DATA_FLAGS = ["--config.data.corpus=kjv:Genesis+Matthew", "--config.data.vocab_size=1000",
              "--config.data.seq_len=64", "--config.data.shuffle_window=16"]
BERT_FLAGS = ["--config.data.tokenizer=bpe", "--config.data.max_predictions_per_seq=10"]
CAUSAL_FLAGS = ["--config.data.num_packing_bins=16"]
SMALL_MODEL_FLAGS = ["--config.model.d_model=32", "--config.model.num_layers=2",
                     "--config.model.num_heads=2", "--config.model.mlp_dim=64"]

# ------------------------------------------------------------------- toy training loop


def train_config(**overrides):
    c = ml_collections.ConfigDict(dict(
        optimizer="adamw", lr=1e-3, schedule="cosine", warmup_steps=10, steps=100,
        final_lr_fraction=0.1, weight_decay=0.01, grad_clip=1.0, grad_accum=1,
        b1=0.9, b2=0.98, eps=1e-8, momentum=0.9, loss_scale="none",
        loss_scale_value=2.0**15, loss_scale_period=2000,
    ))
    c.update(overrides)
    return c


class Toy(nn.Module):
    @nn.compact
    def __call__(self, batch, *, deterministic):
        h = nn.Dense(16)(batch["x"])
        h = nn.Dropout(0.1, deterministic=deterministic)(jax.nn.gelu(h))
        pred = nn.Dense(1)(h)[:, 0]
        loss = jnp.mean((pred - batch["y"]) ** 2) * batch["scale"][0]
        return loss, {"mse": loss}


class Batches:
    """A deterministic iterator with grain-style get_state/set_state."""

    def __init__(self, kill_at=None, nan_at=None, shard=(0, 1), loss_mult=1.0):
        self.index, self.kill_at, self.nan_at, self.loss_mult = 0, kill_at, nan_at, loss_mult
        self.shard = shard  # (process_index, process_count): rows of the global batch

    def __next__(self):
        self.index += 1
        if self.index == self.kill_at:
            os.kill(os.getpid(), signal.SIGTERM)
        rng = np.random.default_rng(self.index)
        x = rng.normal(size=(16, 4)).astype(np.float32)
        scale = np.inf if self.index == self.nan_at else self.loss_mult
        batch = {"x": x, "y": np.sin(x.sum(-1)), "scale": np.full((16,), scale, np.float32)}
        index, count = self.shard
        return {k: np.split(v, count)[index] for k, v in batch.items()}

    def get_state(self):
        return {"index": self.index}

    def set_state(self, state):
        self.index = state["index"]


def toy_loop_config(**train):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = {"name": "toy"}
    c.param = "sp"
    c.data = {"vocab_size": 0, "num_workers": 0}
    c.mesh = {"data": -1, "fsdp": 1, "tensor": 1, "rules": [["batch", ["data", "fsdp"]]]}
    c.train = train_config(steps=10, warmup_steps=2, global_batch_size=16, log_every=1,
                           eval_every=0, eval_batches=1, checkpoint_every=5,
                           keep_checkpoints=3, rms_every=5, profile_start=0,
                           profile_steps=0, preemption_check_every=2,
                           weight_decay=0.0)  # decoupled decay's mask needs u-μP roles
    c.train.update(train)
    return c


def make_task_factory(batches):
    def make_task(cfg):
        return tasks.Task(
            model=Toy(), train_batches=batches, eval_batches=None, flops_per_step=1e6,
            tokens_per_batch=16,
        )
    return make_task
