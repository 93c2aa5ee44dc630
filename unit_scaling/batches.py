"""The fields of each objective's batches, defined once.

The data pipelines (`unit_scaling.data`, the training extra) make these batches and
the models (`unit_scaling.models`, the flax extra) read them, so the field lists live
here, below both, needing only numpy. A field has the shape of one example in named
dimensions, which are `config.data` fields (`seq_len` = L, `max_predictions_per_seq`
= P; a batch adds a leading B), and a dtype; an optional field may be left out of a
batch given to a model.

    MLM_NSP         input_ids, segment_ids, input_mask [L]; masked_lm_positions,
                    masked_lm_ids, masked_lm_weights (float32) [P]; next_sentence_label []
    CAUSAL_LM       input_ids, targets, segment_ids, positions, weights (float32) [L]
    CLASSIFICATION  input_ids, segment_ids, input_mask [L]; label []; weight (float32,
                    optional) []

What each field holds: `unit_scaling.models.bert` and `unit_scaling.models.causal_lm`.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np


@dataclasses.dataclass(frozen=True)
class Field:
    """One field: `shape` of one example in named dimensions, `dtype`, `optional`."""

    shape: tuple[str, ...]
    dtype: str = "int32"
    optional: bool = False


_L = ("seq_len",)
_P = ("max_predictions_per_seq",)

MLM_NSP: Mapping[str, Field] = {
    "input_ids": Field(_L),
    "segment_ids": Field(_L),
    "input_mask": Field(_L),
    "masked_lm_positions": Field(_P),
    "masked_lm_ids": Field(_P),
    "masked_lm_weights": Field(_P, "float32"),
    "next_sentence_label": Field(()),
}
CAUSAL_LM: Mapping[str, Field] = {
    "input_ids": Field(_L),
    "targets": Field(_L),
    "segment_ids": Field(_L),
    "positions": Field(_L),
    "weights": Field(_L, "float32"),
}
CLASSIFICATION: Mapping[str, Field] = {
    "input_ids": Field(_L),
    "segment_ids": Field(_L),
    "input_mask": Field(_L),
    "label": Field(()),
    "weight": Field((), "float32", optional=True),
}


def required(fields: Mapping[str, Field]) -> tuple[str, ...]:
    """The names of the fields a batch must have."""
    return tuple(name for name, field in fields.items() if not field.optional)


def dimensions(fields: Mapping[str, Field]) -> tuple[str, ...]:
    """The named dimensions the fields' shapes use, in first-use order."""
    return tuple(dict.fromkeys(dim for field in fields.values() for dim in field.shape))


def element_spec(
    fields: Mapping[str, Field], batch_size: int, sizes: Mapping[str, int]
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Field name -> (shape, numpy dtype) of a batch of `batch_size` examples, the
    named dimensions given by `sizes`."""
    return {
        name: ((batch_size, *(int(sizes[dim]) for dim in field.shape)), np.dtype(field.dtype))
        for name, field in fields.items()
    }
