"""Data: corpora, tokenizer, BERT MLM+NSP instances, causal-LM packing, grain pipelines.

Depends on no model code. Entry points:

- `make_pretraining_pipeline(config, split)` -> (batch iterator, DataInfo)
  (objectives: `bert_instances.MLM_NSP`, `causal_lm_packing.CAUSAL_LM`; batch fields
  in `unit_scaling.batches`)
- `make_finetune_pipeline(config, task, split)` -> (batch iterator, FinetuneInfo)
  (objective: `finetune.CLASSIFICATION`)
- `load_corpus(spec)`, `tokenizer_from_config(config.data, corpus)`
- `python -m unit_scaling.data --config configs/bert.py:tiny --stats` (inspection CLI)

The tfds builder for local text lives in `unit_scaling.data.tfds_builder` (imported on
demand: it imports tensorflow_datasets).
"""

from unit_scaling._extras import require

require("train", "unit_scaling.data", "grain", "sentencepiece")

from unit_scaling.data.corpora import CorpusError, Document, TfdsNotPreparedError, load_corpus
from unit_scaling.data.finetune import FINETUNE_TASKS, FinetuneInfo, make_finetune_pipeline
from unit_scaling.data.pipeline import DataInfo, make_pretraining_dataset, make_pretraining_pipeline
from unit_scaling.data.tokenizer import SPECIAL_TOKENS, Tokenizer, tokenizer_from_config

__all__ = [
    "FINETUNE_TASKS",
    "SPECIAL_TOKENS",
    "CorpusError",
    "DataInfo",
    "Document",
    "FinetuneInfo",
    "TfdsNotPreparedError",
    "Tokenizer",
    "load_corpus",
    "make_finetune_pipeline",
    "make_pretraining_dataset",
    "make_pretraining_pipeline",
    "tokenizer_from_config",
]
