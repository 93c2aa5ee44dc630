"""What a training objective contributes to a data pipeline: one object per objective.

An `Objective` checks its `config.data` settings (`validate`, before any corpus is read
or tokenizer trained), turns the pipeline's source into examples (`examples`) and
says what a batch of them looks like (`element_spec`, from its fields in
`unit_scaling.batches`). The objects: `bert_instances.MLM_NSP` and
`causal_lm_packing.CAUSAL_LM` (pretraining: their source is groups of tokenized
documents, see `pipeline.py`), `finetune.CLASSIFICATION` (its source is the indices
of labelled examples).

`DocumentGroupExamples` is the flat map the pretraining objectives share.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, Mapping

import grain
import numpy as np

from unit_scaling import batches
from unit_scaling.data.tokenized_corpus import TokenizedCorpus
from unit_scaling.errors import ConfigError


class Objective(abc.ABC):
    """One objective's part of the data pipeline.

    Attributes:
      name: the `config.data.objective` value.
      fields: the batch fields (`unit_scaling.batches`).
    """

    name: str
    fields: Mapping[str, batches.Field]

    @abc.abstractmethod
    def validate(self, data) -> None:
        """Raises ConfigError on `config.data` settings this objective cannot use."""

    @abc.abstractmethod
    def examples(self, source, inputs):
        """The dataset of single examples (dicts with `fields`) made from `source`."""

    def element_spec(self, data, batch_size: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Field name -> (shape, numpy dtype) of a batch of `batch_size` examples."""
        sizes = {dim: int(data[dim]) for dim in batches.dimensions(self.fields)}
        return batches.element_spec(self.fields, batch_size, sizes)


@dataclasses.dataclass(frozen=True)
class PretrainingInputs:
    """What a pretraining objective makes examples from, besides the document groups.

    Attributes:
      data: `config.data`.
      tokenized: the tokenized corpus (any document's sentences).
      documents: the split's document indices (every process's).
      batch_size: the per-process batch size.
      seed: a stage label -> the stage's seed (derived from the run seed and the
        process index).
    """

    data: Any
    tokenized: TokenizedCorpus
    documents: np.ndarray
    batch_size: int
    seed: Callable[[str], int]


class DocumentGroupExamples(grain.experimental.FlatMapTransform):
    """Flat map: a group of (position, document, sentences) -> its shuffled examples.

    Each document's examples are drawn from a generator seeded by (seed, position),
    where position is the document's place in the endless shuffled stream: every
    epoch gets new ones, and re-running the flat map (grain does, to restore an
    iterator) gives the same ones. The group's examples are then shuffled together, so
    a batch mixes many documents.

    Why not grain's WindowShuffleIterDataset: it pays one `index_shuffle` call per
    element, which costs 50 us for a 1024-element window and 700 us for a 64-element
    one (grain 0.2.18, measured here), more than making the example.
    """

    max_fan_out = 1 << 20  # only MapDataset flat maps use it; ours is an IterDataset one

    def __init__(self, seed: int):
        self.seed = seed

    def document_examples(self, document: int, sentences, rng: np.random.Generator) -> list:
        """The examples of one document (subclasses)."""
        raise NotImplementedError

    def flat_map(self, group):
        examples = []
        for position, document, sentences in group:
            if sentences:
                rng = np.random.default_rng((self.seed, position))
                examples.extend(self.document_examples(document, sentences, rng))
        if len(group) > 1 and len(examples) > 1:
            order = np.random.default_rng((self.seed, group[0][0], 1)).permutation(len(examples))
            examples = [examples[i] for i in order]
        return examples


def require(section, name: str, where: str = "config.data"):
    """`section[name]`; ConfigError naming the field when it is missing."""
    if name not in section:
        raise ConfigError(
            f"{where}.{name} is missing; configs/bert.py and configs/causal_lm.py show "
            "every field the data pipeline reads."
        )
    return section[name]
