"""sentencepiece tokenizer with BERT's reserved tokens, trained once per corpus and cached.

Ids 0-4 are reserved in every model this project trains or loads:

    0 [PAD]   1 [UNK]   2 [CLS]   3 [SEP]   4 [MASK]

[CLS]/[SEP] are sentencepiece's bos/eos and [MASK] a control symbol, so none of them
can come out of encoding text that happens to contain the string "[MASK]". The
causal LM uses [CLS] as beginning- and [SEP] as end-of-document.

`load_or_train_tokenizer` trains a unigram or BPE model on a sample of the corpus on
first use and caches it under `cache_dir()/tokenizers/`, keyed by a hash of the corpus
fingerprint and every training setting; the next call with the same key loads it.
The cache directory is `$UNIT_SCALING_CACHE_DIR`, else `$XDG_CACHE_HOME/unit_scaling`,
else `~/.cache/unit_scaling`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pathlib
import re
import tempfile
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm
from etils import epath

from unit_scaling.errors import UserError
from unit_scaling.data import corpora

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(len(SPECIAL_TOKENS))
NUM_SPECIAL_TOKENS = len(SPECIAL_TOKENS)
KINDS = ("unigram", "bpe")
CACHE_ENV = "UNIT_SCALING_CACHE_DIR"
# Bump when the training recipe changes, so old cached models are not reused.
_RECIPE_VERSION = 1
_WORD_BOUNDARY = "\u2581"  # sentencepiece's "▁", marks a piece that starts a word

log = logging.getLogger(__name__)

# sentencepiece's trainer splits its work over threads, and the pieces it learns depend
# on how many (unigram and BPE alike): a fixed count makes the tokenizer a function of
# the corpus and the settings alone, whatever machine trains it. 2, not 1: the tokenizers
# this project's tests and results were made with (on 2 cores), at twice the speed.
TRAINER_THREADS = 2


class TokenizerError(UserError, ValueError):
    """A tokenizer setting or file that cannot work; names the field and the fix."""


def cache_dir() -> pathlib.Path:
    """The user cache directory for tokenizers ($UNIT_SCALING_CACHE_DIR first)."""
    if os.environ.get(CACHE_ENV):
        return pathlib.Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return pathlib.Path(base).expanduser() / "unit_scaling"


class Tokenizer:
    """A sentencepiece model whose ids 0-4 are `SPECIAL_TOKENS`.

    Attributes:
      vocab_size: number of pieces (ids are in [0, vocab_size)).
      word_start: bool[vocab_size]; True where a piece starts a word (whole-word
        masking groups a word-start piece with the continuation pieces after it).
      path: the `.model` file it came from, if any.
      from_cache: True when `load_or_train_tokenizer` found it in the cache.
    """

    pad_id, unk_id, cls_id, sep_id, mask_id = PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID
    bos_id, eos_id = CLS_ID, SEP_ID

    def __init__(self, model_proto: bytes, *, path: str | None = None, from_cache: bool = False):
        self._proto = bytes(model_proto)
        self.path = path
        self.from_cache = from_cache
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        self.vocab_size = self._sp.get_piece_size()
        self._pieces = [self._sp.id_to_piece(i) for i in range(self.vocab_size)]
        where = path or "the trained model"
        if (
            self.vocab_size <= NUM_SPECIAL_TOKENS
            or tuple(self._pieces[:NUM_SPECIAL_TOKENS]) != SPECIAL_TOKENS
        ):
            raise TokenizerError(
                f"data.tokenizer_path={where!r}: ids 0-4 must be {' '.join(SPECIAL_TOKENS)}, "
                f"got {' '.join(self._pieces[:NUM_SPECIAL_TOKENS])}. Leave "
                "data.tokenizer_path empty to train one, or train it with "
                "unit_scaling.data.tokenizer.train_tokenizer."
            )
        self.word_start = np.array(
            [
                i < NUM_SPECIAL_TOKENS or p.startswith(_WORD_BOUNDARY)
                for i, p in enumerate(self._pieces)
            ]
        )

    @classmethod
    def load(cls, path: str | os.PathLike, *, from_cache: bool = False) -> "Tokenizer":
        """Loads a `.model` file (raises TokenizerError naming data.tokenizer_path)."""
        path = os.fspath(path)
        # A URL (a run directory on gs://) goes through epath; a local path as given.
        file = epath.Path(path) if "://" in path else pathlib.Path(os.path.expanduser(path))
        path = os.fspath(file)
        if not file.is_file():
            raise TokenizerError(
                f"data.tokenizer_path={path!r} does not exist; give an existing "
                "sentencepiece .model file or leave it empty to train one."
            )
        proto = file.read_bytes()
        try:
            return cls(proto, path=path, from_cache=from_cache)
        except RuntimeError as e:  # sentencepiece's parse error
            raise TokenizerError(
                f"data.tokenizer_path={path!r} is not a sentencepiece model ({e})."
            ) from e

    @property
    def model_proto(self) -> bytes:
        """The serialized sentencepiece model."""
        return self._proto

    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text`: int32[n] (no special tokens added)."""
        return np.asarray(self._sp.encode(text), dtype=np.int32)

    def encode_many(self, texts: Sequence[str]) -> list[np.ndarray]:
        """`encode` for each text (one sentencepiece call): list of int32[n_i]."""
        return [np.asarray(ids, dtype=np.int32) for ids in self._sp.encode(list(texts))]

    def piece(self, token_id: int) -> str:
        """The piece string of one id (special tokens as "[MASK]" etc.)."""
        return self._pieces[int(token_id)]

    def decode(self, ids: Iterable[int], *, skip_padding: bool = True) -> str:
        """Readable text for `ids`, special tokens shown as "[CLS]" etc."""
        out = []
        for i in ids:
            i = int(i)
            if skip_padding and i == PAD_ID:
                continue
            if i < NUM_SPECIAL_TOKENS:
                out.append(f" {self._pieces[i]} ")
            else:
                out.append(self._pieces[i].replace(_WORD_BOUNDARY, " "))
        return " ".join("".join(out).split())

    def __getstate__(self):
        return {"proto": self._proto, "path": self.path, "from_cache": self.from_cache}

    def __setstate__(self, state):
        self.__init__(state["proto"], path=state["path"], from_cache=state["from_cache"])

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, path={self.path!r})"


def train_tokenizer(
    sentences: Iterable[str], *, kind: str, vocab_size: int, num_threads: int | None = None
) -> Tokenizer:
    """Trains a sentencepiece `kind` ("unigram" | "bpe") model on `sentences`.

    The model has at most `vocab_size` pieces: on a small corpus sentencepiece may stop
    earlier (e.g. a unigram model on the KJV reaches about 10.8k pieces). Deterministic:
    `num_threads` defaults to `TRAINER_THREADS`, not the machine's core count.
    """
    if kind not in KINDS:
        raise TokenizerError(f"data.tokenizer={kind!r}; use one of {KINDS}.")
    if vocab_size <= NUM_SPECIAL_TOKENS:
        raise TokenizerError(
            f"data.vocab_size={vocab_size} leaves no room beside the {NUM_SPECIAL_TOKENS} "
            "reserved tokens; use at least a few hundred."
        )
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            model_type=kind,
            vocab_size=vocab_size,
            # Small corpora cannot fill a large vocabulary; take what they support.
            hard_vocab_limit=False,
            pad_id=PAD_ID,
            pad_piece=SPECIAL_TOKENS[PAD_ID],
            unk_id=UNK_ID,
            unk_piece=SPECIAL_TOKENS[UNK_ID],
            bos_id=CLS_ID,
            bos_piece=SPECIAL_TOKENS[CLS_ID],
            eos_id=SEP_ID,
            eos_piece=SPECIAL_TOKENS[SEP_ID],
            control_symbols=[SPECIAL_TOKENS[MASK_ID]],
            num_threads=num_threads or TRAINER_THREADS,
            minloglevel=2,
        )
    except RuntimeError as e:
        msg = str(e)
        if "required_chars" in msg:
            needed = re.search(r"(\d+) vs (\d+)", msg)
            raise TokenizerError(
                f"data.vocab_size={vocab_size} is smaller than the number of distinct "
                "characters in the corpus sample plus the reserved tokens"
                + (f" ({needed.group(2)})" if needed else "")
                + "; raise data.vocab_size."
            ) from e
        raise TokenizerError(f"sentencepiece training failed: {msg}") from e
    return Tokenizer(model.getvalue())


def sample_sentences(corpus: corpora.Corpus, max_sentences: int) -> list[str]:
    """Up to `max_sentences` sentences from documents in a fixed pseudo-random order.

    The order is fixed (seed 0), so the sample, and therefore the tokenizer, depends
    only on the corpus and `max_sentences`.
    """
    if max_sentences <= 0:
        raise TokenizerError(f"data.tokenizer_sample_size={max_sentences}; it must be positive.")
    order = np.random.default_rng(0).permutation(len(corpus))
    out: list[str] = []
    for index in order:
        out.extend(corpus[int(index)].sentences)
        if len(out) >= max_sentences:
            return out[:max_sentences]
    return out


def tokenizer_cache_key(
    corpus: corpora.Corpus, *, kind: str, vocab_size: int, sample_size: int
) -> str:
    """Hex digest identifying a trained tokenizer: corpus fingerprint + every setting."""
    settings = {
        "corpus": corpus.fingerprint(),
        "kind": kind,
        "vocab_size": int(vocab_size),
        "sample_size": int(sample_size),
        "special": SPECIAL_TOKENS,
        "sentencepiece": spm.__version__,
        "recipe": _RECIPE_VERSION,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def load_or_train_tokenizer(
    corpus: corpora.Corpus,
    *,
    kind: str,
    vocab_size: int,
    sample_size: int,
    directory: str | os.PathLike | None = None,
) -> Tokenizer:
    """The cached tokenizer for (corpus, settings), training and caching it if missing.

    Args:
      corpus: the corpus to sample sentences from.
      kind: "unigram" or "bpe".
      vocab_size: the most pieces the model may have.
      sample_size: the most sentences to train on.
      directory: cache root; None = `cache_dir()`.

    Returns:
      The tokenizer; `from_cache` tells whether it was loaded rather than trained.
    """
    if kind not in KINDS:
        raise TokenizerError(f"data.tokenizer={kind!r}; use one of {KINDS}.")
    key = tokenizer_cache_key(corpus, kind=kind, vocab_size=vocab_size, sample_size=sample_size)
    root = pathlib.Path(directory).expanduser() if directory else cache_dir()
    path = root / "tokenizers" / f"{kind}-{vocab_size}-{key[:20]}.model"
    if path.is_file():
        return Tokenizer.load(path, from_cache=True)
    sentences = sample_sentences(corpus, sample_size)
    if not sentences:
        raise corpora.CorpusError(
            f"data.corpus={corpus.spec!r} has no sentences to train a tokenizer on; "
            "point data.corpus at a corpus with text."
        )
    log.info(
        "Training a %s tokenizer (vocab %d) on %d sentences of %s",
        kind,
        vocab_size,
        len(sentences),
        corpus.spec,
    )
    tokenizer = train_tokenizer(sentences, kind=kind, vocab_size=vocab_size)
    if tokenizer.vocab_size < vocab_size:
        log.warning(
            "%s supports only %d %s pieces (data.vocab_size=%d); ids above stay unused.",
            corpus.spec,
            tokenizer.vocab_size,
            kind,
            vocab_size,
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {
        "corpus": corpus.spec,
        "fingerprint": corpus.fingerprint(),
        "kind": kind,
        "vocab_size": vocab_size,
        "pieces": tokenizer.vocab_size,
        "sample_size": sample_size,
        "sentences": len(sentences),
    }
    _atomic_write(path.with_suffix(".json"), json.dumps(info, indent=1).encode())
    # The .model last: its presence is what marks the cache entry complete.
    _atomic_write(path, tokenizer.model_proto)
    tokenizer.path = str(path)
    return tokenizer


def tokenizer_from_config(data_config, corpus: corpora.Corpus | None = None) -> Tokenizer:
    """The tokenizer `config.data` asks for: `tokenizer_path`, else trained on `corpus`."""
    if data_config.get("tokenizer_path"):
        tokenizer = Tokenizer.load(data_config.tokenizer_path)
    else:
        if corpus is None:
            raise TokenizerError(
                "a corpus is needed to train a tokenizer (data.tokenizer_path is empty)."
            )
        tokenizer = load_or_train_tokenizer(
            corpus,
            kind=data_config.tokenizer,
            vocab_size=data_config.vocab_size,
            sample_size=data_config.get("tokenizer_sample_size", 1_000_000),
        )
    if tokenizer.vocab_size > data_config.vocab_size:
        raise TokenizerError(
            f"the tokenizer has {tokenizer.vocab_size} pieces but data.vocab_size="
            f"{data_config.vocab_size}; set data.vocab_size >= {tokenizer.vocab_size}."
        )
    return tokenizer


def _atomic_write(path: pathlib.Path, data: bytes) -> None:
    # Write-then-rename, so concurrent processes (pytest-xdist workers, hosts sharing a
    # home directory) never read a half-written file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
