"""A corpus seen through a tokenizer: document index -> token arrays, cached.

Tokenization happens on first access, so a large tfds corpus is never tokenized up
front; a bounded LRU cache keeps small corpora (the KJV's 1189 chapters) tokenized
after the first epoch and serves the random "other document" reads of NSP.
"""

from __future__ import annotations

import functools

import numpy as np

from unit_scaling.data.corpora import Corpus
from unit_scaling.data.tokenizer import Tokenizer


class TokenizedCorpus:
    """`tc[i]`: the non-empty sentences of document i as a tuple of int32 arrays.

    Args:
      corpus: the documents.
      tokenizer: the tokenizer.
      cache_size: how many tokenized documents to keep (the KJV has 1189; 4096
        wikipedia articles take about 50 MB).
    """

    def __init__(self, corpus: Corpus, tokenizer: Tokenizer, cache_size: int = 4096):
        self.corpus = corpus
        self.tokenizer = tokenizer
        self.cache_size = cache_size
        self._cached = functools.lru_cache(maxsize=cache_size)(self._tokenize)

    def __len__(self) -> int:
        return len(self.corpus)

    def __getitem__(self, index: int) -> tuple[np.ndarray, ...]:
        return self._cached(int(index))

    def _tokenize(self, index: int) -> tuple[np.ndarray, ...]:
        sentences = self.corpus[index].sentences
        if not sentences:
            return ()
        return tuple(ids for ids in self.tokenizer.encode_many(sentences) if ids.size)

    def num_tokens(self, index: int) -> int:
        """Total tokens of document `index`."""
        return int(sum(s.size for s in self[index]))

    def __getstate__(self):
        # The cache stays behind; a worker process fills its own.
        return {"corpus": self.corpus, "tokenizer": self.tokenizer, "cache_size": self.cache_size}

    def __setstate__(self, state):
        self.__init__(state["corpus"], state["tokenizer"], state["cache_size"])
