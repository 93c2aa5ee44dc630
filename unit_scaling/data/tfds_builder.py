"""A tfds builder that stores any local corpus (the KJV included) as array_record.

    spec = build_tfds_corpus("kjv", name="kjv", data_dir="~/tensorflow_datasets")
    # spec == "tfds:unit_scaling_text/kjv"; use it as config.data.corpus, with
    # config.data.tfds_data_dir set to the same data_dir.

or from the command line: `python -m unit_scaling.data --build_tfds=kjv
--config.data.corpus=kjv --tfds_data_dir=DIR`.

The dataset `unit_scaling_text/NAME` has one split, `train`, with one example per
document, in corpus order (shuffling disabled), and two features:

    sentences  Sequence(Text)  the document's sentences
    title      Text            "Genesis 1" for the KJV, the file path for text files

Reading it back through `tfds:unit_scaling_text/NAME` gives exactly the documents
of the source corpus, so every source can take the same (tfds, array_record) path.
Needs no TensorFlow. An already prepared NAME is reused as it is; delete its
directory to rebuild it.
"""

from __future__ import annotations

import dataclasses
import re

import tensorflow_datasets as tfds

from unit_scaling.data import corpora

DATASET_NAME = "unit_scaling_text"
_CONFIG_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclasses.dataclass
class TextCorpusConfig(tfds.core.BuilderConfig):
    """Builder config: `corpus` is a `load_corpus` spec (kjv, text:GLOB, tfds:...)."""

    corpus: str = "kjv"


class UnitScalingText(tfds.core.GeneratorBasedBuilder):
    """Documents of a local corpus, as sentences, in array_record files."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Documents as sentence sequences with a title."}
    BUILDER_CONFIGS = [
        TextCorpusConfig(
            name="kjv", corpus="kjv", description="King James Bible, chapter = document."
        )
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="A local text corpus: one example per document.",
            features=tfds.features.FeaturesDict(
                {
                    "sentences": tfds.features.Sequence(tfds.features.Text()),
                    "title": tfds.features.Text(),
                }
            ),
            # Keep corpus order, so document i here is document i of the source.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        corpus = corpora.load_corpus(self.builder_config.corpus)
        for index, document in enumerate(corpus):
            yield index, {"sentences": list(document.sentences), "title": _title(document.metadata)}


def build_tfds_corpus(corpus: str, *, name: str, data_dir: str | None = None) -> str:
    """Prepares `unit_scaling_text/name` from corpus spec `corpus`; returns its spec.

    Args:
      corpus: what `load_corpus` reads (`kjv`, `kjv:Genesis`, `text:GLOB`, ...).
      name: the dataset config name ([A-Za-z0-9_.-]+).
      data_dir: tfds data dir; None = tfds's default.

    Returns:
      "tfds:unit_scaling_text/NAME", the value for `config.data.corpus`.
    """
    if not _CONFIG_NAME.match(name):
        raise ValueError(f"--build_tfds={name!r}: use letters, digits, '_', '.' or '-'.")
    corpora.load_corpus(corpus)  # fail early, with the corpus's own message
    builder = UnitScalingText(
        config=TextCorpusConfig(name=name, corpus=corpus, description=f"Built from {corpus}."),
        data_dir=data_dir,
        file_format="array_record",
    )
    builder.download_and_prepare()
    return f"tfds:{DATASET_NAME}/{name}"


def _title(metadata) -> str:
    if "book" in metadata:
        return f"{metadata['book']} {metadata['chapter']}"
    for key in ("title", "path"):
        if key in metadata:
            return str(metadata[key])
    return ""
