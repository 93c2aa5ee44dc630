"""This project's reference logits, and an export written to disk (`write`, `export_run`)."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unit_scaling._extras import require
from unit_scaling.export.bert import bert_checkpoint
from unit_scaling.export.folding import Checkpoint, ExportError, _Scales, check_exportable
from unit_scaling.export.llama import llama_checkpoint
from unit_scaling.models import bert, causal_lm
from unit_scaling.models.transformer import TransformerConfig

SAFETENSORS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.model"


# ----------------------------------------------------------------- reference logits


def reference_logits(cfg: TransformerConfig, params: Any, input_ids: Any,
                     segment_ids: Any = None, input_mask: Any = None) -> dict[str, jax.Array]:
    """This project's logits as its cross entropy sees them (`loss_mult * logits`,
    float32, eval mode), which the export reproduces. BERT: `{"mlm": [B, L, V] at every
    position, "nsp": [B, 2]}`; causal LM: `{"logits": [B, L, V]}`."""
    lam = _Scales(cfg.parametrization.ops).loss_mult
    variables = {"params": nn.unbox(params)}
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if isinstance(cfg, causal_lm.CausalLMConfig):
        logits = causal_lm.CausalLM(cfg).apply(variables, input_ids,
                                               method=causal_lm.CausalLM.logits)
        return {"logits": lam * logits}
    batch, length = input_ids.shape
    segment_ids = jnp.zeros_like(input_ids) if segment_ids is None else jnp.asarray(segment_ids)
    input_mask = jnp.ones_like(input_ids) if input_mask is None else jnp.asarray(input_mask)
    positions = jnp.broadcast_to(jnp.arange(length)[None], (batch, length))

    def heads(model):
        hidden = model.encoder(input_ids, segment_ids, input_mask, deterministic=True)
        return model.mlm_logits(hidden, positions), model.nsp(model.pooler(hidden))

    mlm, nsp = nn.apply(heads, bert.BertForPreTraining(cfg))(variables)
    return {"mlm": lam * mlm, "nsp": lam * nsp.astype(jnp.float32)}


# --------------------------------------------------------------------- writing


def checkpoint(cfg: TransformerConfig, params: Any, seq_len: Optional[int] = None
               ) -> Checkpoint:
    """`bert_checkpoint` (at `seq_len`, default `max_len`) or `llama_checkpoint`."""
    if check_exportable(cfg) == "bert":
        ckpt = bert_checkpoint(cfg, params, seq_len or cfg.max_len)
    else:
        ckpt = llama_checkpoint(cfg, params)
    if cfg.precision != "fp32":
        ckpt.notes.append(f"the run computed in precision={cfg.precision!r}; the export's "
                          "float32 weights compute in float32 (its logits differ by that "
                          "rounding)")
    return ckpt


def write(ckpt: Checkpoint, out: str | os.PathLike, tokenizer: Optional[Any] = None,
          metadata: Optional[dict] = None) -> str:
    """Writes `ckpt` to the directory `out` (created): `config.json`,
    `model.safetensors` (metadata format "pt": the PyTorch classes load it, and the
    Flax ones convert it) and, if given, the sentencepiece model file `tokenizer`
    (a path) as `tokenizer.model`. `metadata` goes into config.json's `unit_scaling`."""
    require("export", "unit_scaling.export", "safetensors")
    from safetensors.numpy import save_file

    out = os.fspath(out)
    os.makedirs(out, exist_ok=True)
    config = dict(ckpt.config)
    config["unit_scaling"] = dict(config.get("unit_scaling", {}), **(metadata or {}))
    with open(os.path.join(out, CONFIG), "w") as f:
        json.dump(config, f, indent=2)
    tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in ckpt.tensors.items()}
    save_file(tensors, os.path.join(out, SAFETENSORS), metadata={"format": "pt"})
    if tokenizer is not None:
        shutil.copyfile(os.fspath(tokenizer), os.path.join(out, TOKENIZER))
        if config["model_type"] == "llama":
            # LlamaTokenizer reads the sentencepiece model; [CLS] starts a document.
            with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
                json.dump(dict(tokenizer_class="LlamaTokenizer", bos_token="[CLS]",
                               eos_token="[SEP]", unk_token="[UNK]", pad_token="[PAD]",
                               add_bos_token=True, add_eos_token=False, legacy=True), f,
                          indent=2)
    return out


def export_run(workdir: str, out: str, step: Optional[int] = None) -> str:
    """Exports checkpoint `step` (default: the latest) of the run in `workdir` to `out`
    with the run's tokenizer; returns `out`."""
    from unit_scaling.train import tasks
    from unit_scaling.train.rundir import RunDir

    run = RunDir(workdir)
    config = run.read_config()  # RunDirError: missing, or not a train.py run
    objective = config.data.objective
    if objective not in ("mlm_nsp", "causal_lm"):
        raise ExportError(f"--workdir {workdir} trained {objective!r}; only 'mlm_nsp' (BERT "
                          "pretraining) and 'causal_lm' runs export")
    cfg = tasks.model_config(config, config.data.vocab_size)
    check_exportable(cfg)  # before reading the weights
    params, step = run.restore_params(step)
    ckpt = checkpoint(cfg, params, seq_len=config.data.seq_len)
    tokenizer = run.tokenizer if run.tokenizer.exists() else None
    return write(ckpt, out, tokenizer, metadata=dict(workdir=str(run), step=step))
