r"""Sample from a causal-LM run: `python -m unit_scaling.generate --workdir RUN`.

  python -m unit_scaling.generate --workdir runs/lm-tiny --prompt "In the beginning" \
      --max_new_tokens 64 --temperature 0.8 --top_p 0.9

Rebuilds the model from `RUN/config.json`, loads the run's own tokenizer
(`RUN/tokenizer.model`), restores the parameters of the
latest checkpoint and decodes with the KV cache. A prompt is encoded as the pipeline
encodes a document (`[CLS]` then its pieces); generation stops at the end-of-document
`[SEP]`. Temperature 0 is greedy.

Smaller models (`unit_scaling.compress`, the flags of `unit_scaling.evaluate`):

  python -m unit_scaling.generate --workdir runs/lm-tiny --weights int8 \
      --scales per_channel --kv_cache fp8

`--weights bf16|fp8|int8` stores the weights in that format (`--scales none`: a plain
cast; `per_channel`: absmax scales per output channel) and dequantises them inside
each decode step; `--kv_cache bf16|fp8|int8` stores keys and values so (`--scales`
per token and head); `--rank_fraction F` replaces the projections by rank-F SVD
factors. Bad combinations fail before anything loads, naming the flag.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from absl import app, flags

from unit_scaling import compress, errors, host_memory
from unit_scaling.evaluate import compression_from_flags, define_compression_flags
from unit_scaling.errors import ConfigError
from unit_scaling.data import corpora
from unit_scaling.data.tokenizer import CLS_ID, SEP_ID, Tokenizer, tokenizer_from_config
from unit_scaling.models import causal_lm
from unit_scaling.train import tasks
from unit_scaling.train.rundir import RunDir, RunDirError

def load_run(workdir: str, compression: compress.Compression = compress.Compression()):
    """`(model, params, tokenizer, config)` of the latest checkpoint of a causal-LM run;
    the model has `compression`'s KV cache (its weights are the caller's:
    `compress.compress(params, compression)`)."""
    run = RunDir(workdir)
    config = run.read_config()  # RunDirError: missing, or not a train.py run
    if config.data.objective != "causal_lm":
        raise ConfigError(f"--workdir {workdir} trained {config.data.objective!r}, not a "
                          "causal LM; pass the --workdir of a configs/causal_lm.py run")
    if not run.checkpoint_steps():
        raise RunDirError(f"--workdir {workdir} has no checkpoint yet in {run.checkpoints}; "
                          "let the run save one (checkpoint_every, or its last step)")
    compression.check(config.data.objective)
    if run.tokenizer.exists():  # the tokenizer the run trained with
        tokenizer = Tokenizer.load(run.tokenizer)
    else:  # a run from before workdirs kept their tokenizer
        corpus = None if config.data.tokenizer_path else corpora.load_corpus(
            config.data.corpus, tfds_data_dir=config.data.tfds_data_dir or None)
        tokenizer = tokenizer_from_config(config.data, corpus)
    model = causal_lm.CausalLM(dataclasses.replace(
        tasks.model_config(config, config.data.vocab_size), **compression.model_fields()))
    params, _ = run.restore_params()
    return model, params, tokenizer, config


def check_lengths(prompt_tokens: int, max_new_tokens: int, max_len: int) -> None:
    """`ConfigError` unless 1 <= max_new_tokens and prompt + new tokens fit max_len."""
    if max_new_tokens < 1:
        raise ConfigError(f"--max_new_tokens={max_new_tokens} must be >= 1")
    if prompt_tokens + max_new_tokens > max_len:
        room = max_len - max_new_tokens
        raise ConfigError(
            f"the prompt is {prompt_tokens} tokens ([CLS] included) and --max_new_tokens="
            f"{max_new_tokens}, more than the model's max_len={max_len} together: the prompt "
            f"may be at most {max(room, 0)} tokens with this --max_new_tokens"
            + ("" if room > 1 else f" (lower --max_new_tokens below {max_len})"))


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
    define_compression_flags(finetune=False)


@errors.reported
def main(argv):
    del argv
    host_memory.keep_freed_memory()  # before JAX's CPU client exists: see host_memory.py
    f = flags.FLAGS
    if f.max_new_tokens < 1:  # before loading anything
        check_lengths(0, f.max_new_tokens, 1)
    compression = compression_from_flags()
    model, params, tokenizer, _ = load_run(f.workdir, compression)
    params, prepare = compress.compress(params, compression)
    prompt = np.concatenate([[CLS_ID], tokenizer.encode(f.prompt)]).astype(np.int32)
    check_lengths(len(prompt), f.max_new_tokens, model.config.max_len)
    prompts = np.tile(prompt[None], (f.num_samples, 1))
    new = causal_lm.generate(
        model, params, prompts, f.max_new_tokens, jax.random.key(f.seed),
        temperature=f.temperature, top_k=f.top_k, top_p=f.top_p, prepare=prepare,
    )
    for row in np.asarray(new):
        end = np.flatnonzero(row == SEP_ID)
        print(continuation_text(tokenizer, f.prompt, row[: end[0]] if end.size else row))


def continuation_text(tokenizer: Tokenizer, prompt: str, new_ids) -> str:
    """`prompt` as typed, then the decoded `new_ids`, with the space their first piece
    begins with (`decode` drops a leading one: "In the" + "beginning", not "In
    thebeginning")."""
    new_ids = [int(i) for i in new_ids]
    text = tokenizer.decode(new_ids)
    space = " " if text and prompt and tokenizer.word_start[new_ids[0]] else ""
    return prompt + space + text


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=errors.flags_parser)
