r"""Sample from a causal-LM run: `python -m unit_scaling.generate --workdir RUN`.

  python -m unit_scaling.generate --workdir runs/lm-tiny --prompt "In the beginning" \
      --max_new_tokens 64 --temperature 0.8 --top_p 0.9

Rebuilds the model and tokenizer from `RUN/config.json`, restores the parameters of the
latest checkpoint and decodes with the KV cache. A prompt is encoded as the pipeline
encodes a document (`[CLS]` then its pieces); generation stops at the end-of-document
`[SEP]`. Temperature 0 is greedy.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags

from unit_scaling.data import corpora
from unit_scaling.data.tokenizer import CLS_ID, SEP_ID, tokenizer_from_config
from unit_scaling.models import causal_lm
from unit_scaling.train import tasks

def load_run(workdir: str):
    """`(model, params, tokenizer, config)` of the latest checkpoint of a causal-LM run."""
    with open(os.path.join(workdir, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    if config.data.objective != "causal_lm":
        raise ValueError(f"{workdir} trained {config.data.objective!r}, not a causal LM")
    corpus = None if config.data.tokenizer_path else corpora.load_corpus(
        config.data.corpus, tfds_data_dir=config.data.tfds_data_dir or None)
    tokenizer = tokenizer_from_config(config.data, corpus)
    model = causal_lm.CausalLM(tasks.model_config(config, config.data.vocab_size))
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    with ocp.CheckpointManager(directory, item_names=("state", "data", "config")) as mngr:
        if mngr.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint in {directory}")
        restored = mngr.restore(mngr.latest_step(),
                                args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return model, restored["state"]["params"], tokenizer, config


def _define_flags() -> None:
    # Defined only when run as a program, so that importing `load_run` next to other
    # absl programs (train.py defines --workdir too) does not clash.
    flags.DEFINE_string("workdir", None, "A causal-LM training run.", required=True)
    flags.DEFINE_string("prompt", "", "Text to continue.")
    flags.DEFINE_integer("max_new_tokens", 48, "Tokens to sample.")
    flags.DEFINE_float("temperature", 0.8, "0 = greedy.")
    flags.DEFINE_integer("top_k", None, "Sample among the k most likely tokens.")
    flags.DEFINE_float("top_p", None, "Sample from the smallest set with this mass.")
    flags.DEFINE_integer("num_samples", 1, "Samples to draw.")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")


def main(argv):
    del argv
    f = flags.FLAGS
    model, params, tokenizer, _ = load_run(f.workdir)
    prompt = np.concatenate([[CLS_ID], tokenizer.encode(f.prompt)]).astype(np.int32)
    prompts = np.tile(prompt[None], (f.num_samples, 1))
    new = causal_lm.generate(
        model, params, prompts, f.max_new_tokens, jax.random.key(f.seed),
        temperature=f.temperature, top_k=f.top_k, top_p=f.top_p,
    )
    for row in np.asarray(new):
        end = np.flatnonzero(row == SEP_ID)
        row = row[: end[0]] if end.size else row
        print(f.prompt + tokenizer.decode(row.tolist()))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
