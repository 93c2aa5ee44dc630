r"""Export a run as a Hugging Face checkpoint, every static scale folded into the weights.

  python -m unit_scaling.export --workdir runs/bert-tiny --out exported/bert-tiny [--step N]

writes `OUT/config.json`, `OUT/model.safetensors` (PyTorch layout and names, float32) and
the run's sentencepiece `OUT/tokenizer.model`. Standard code then loads a plain model:

  BERT (MLM + NSP)  -> `BertForPreTraining`   (post-norm LayerNorm, GELU, absolute
                       positions, token types; `FlaxBertForPreTraining` too)
  causal LM         -> `LlamaForCausalLM`     (pre-norm RMSNorm, RoPE, SwiGLU, no biases;
                       `FlaxLlamaForCausalLM` too)

for `sp`, `unit` and `umup` alike: the exported model's logits are the logits this
project's cross entropy sees (`loss_mult * logits`, see `reference_logits`), in float32.

How the scales are found. Every unit-scaled op runs `scale_fwd(f(x), s)` with a static
`s` around a plain function `f` (`unit_scaling.functional`). The exporter reads each `s`
off the very op the model runs (`Parametrization.ops`), by evaluating it on a probe
input (`_Scales`), so the export cannot drift from the ops. Where each `s` goes is the
folding rule written next to the code (`export/bert.py`, `export/llama.py`); `sp`'s ops have no scales (all 1), so its
export is a renaming.

What is exact and what is not. Every fold is exact, except where a scale reaches a
norm directly (LayerNorm / RMSNorm without a linear layer in between): a norm is scale
invariant but for its epsilon, `norm(c z; eps) = norm(z; eps / c^2)`. Two places:
BERT's MLM head (`dense -> gelu -> LayerNorm`: the unit-scaled gelu's output scale) and
the causal LM's pre-norm stream (the residual taus make HF's stream `sigma` times this
project's, sigma between 1 and the product of `(1+tau^2)^1/2`; each norm sees it). The
relative change is about `eps |1 - 1/c^2| / (2 mean(z^2))`: 1e-12 for BERT's eps 1e-12,
below 1e-6 at eps 1e-6. config.json lists them per export (its "unit_scaling" entry,
key "notes").

BERT: the unit/umup attention output scale and the post-norm taus depend on the
sequence length (`S = k_len`); the export fixes them at `seq_len` (the run's
`data.seq_len`, the padded length it trained on, kept in config.json as "seq_len" of
its "unit_scaling" entry): pad inputs to that length to get this project's logits.
The causal LM's scales use `max_len`, so its export holds at every length.

Refused (`ExportError`, naming the field): what the target class cannot express —
BERT: `norm_position` other than "post", `norm` other than "layer_norm",
`activation` other than "gelu", `position` "rope"; causal LM: `norm_position` other
than "pre", `norm` other than "rms_norm", `activation` other than "swiglu", `position`
other than "rope", `use_bias=True`. Accepted as exact: u-μP's `act_mult` (gelu(a x)/a
and x silu(a g) follow a linear layer, whose weights take `a`), `attn_mult`, the
residual taus, `loss_mult`, eval-mode dropout scales, tied or untied readouts, biases
off (BERT: written as zeros), sinusoidal BERT positions (written as the table of
`max_len` rows they are), `scan_layers`. Weights are written in float32 whatever the
run's `precision` (a bf16 or fp8 run's own logits differ from them by its rounding; a
note says so). transformers 4.57's `FlaxLlamaForCausalLM` cuts its rotary table to
`max_position_embeddings` columns: it needs `max_len >= 2 head_dim` (the PyTorch class
does not).
"""


from unit_scaling.export.folding import Checkpoint, ExportError, check_exportable
from unit_scaling.export.bert import bert_checkpoint
from unit_scaling.export.llama import llama_checkpoint
from unit_scaling.export.io import (
    CONFIG, SAFETENSORS, TOKENIZER, checkpoint, export_run, reference_logits, write)

__all__ = ["CONFIG", "Checkpoint", "ExportError", "SAFETENSORS", "TOKENIZER",
           "bert_checkpoint", "check_exportable", "checkpoint", "export_run",
           "llama_checkpoint", "reference_logits", "write"]
