"""BERT MLM+NSP instances: layout, NSP pairs, masking statistics, whole words, errors."""

import numpy as np
import pytest

from unit_scaling.batches import MLM_NSP
from unit_scaling.data import bert_instances as bi
from unit_scaling.data.tokenizer import CLS_ID, MASK_ID, NUM_SPECIAL_TOKENS, SEP_ID

SEQ_LEN, MAX_PRED = 64, 10


def synthetic_corpus(num_docs=40, seed=0):
    """Documents whose every token id is unique, so each id tells (document, offset)."""
    rng = np.random.default_rng(seed)
    docs, owner, next_id = [], {}, NUM_SPECIAL_TOKENS
    for d in range(num_docs):
        sentences = []
        for _ in range(rng.integers(1, 25)):
            n = int(rng.integers(1, 30))
            ids = np.arange(next_id, next_id + n, dtype=np.int32)
            owner.update({int(i): (d, int(i)) for i in ids})
            sentences.append(ids)
            next_id += n
        docs.append(tuple(sentences))
    return docs, owner, next_id


def make_all(docs, config, seed=0, word_start=None):
    rng = np.random.default_rng(seed)
    out = []
    for d, doc in enumerate(docs):

        def other(r, d=d):
            while True:
                o = int(r.integers(len(docs)))
                if o != d:
                    return docs[o]

        out.extend(
            (d, inst)
            for inst in bi.create_instances_from_document(doc, other, rng, config, word_start)
        )
    return out


def unmask(inst):
    original = inst["input_ids"].copy()
    w = inst["masked_lm_weights"] > 0
    original[inst["masked_lm_positions"][w]] = inst["masked_lm_ids"][w]
    return original


@pytest.fixture(scope="module")
def corpus_and_instances():
    docs, owner, vocab = synthetic_corpus(num_docs=80)
    config = bi.BertInstanceConfig(
        seq_len=SEQ_LEN, max_predictions_per_seq=MAX_PRED, vocab_size=vocab
    )
    return docs, owner, config, make_all(docs, config)


def test_layout_and_dtypes(corpus_and_instances):
    _, _, _, instances = corpus_and_instances
    for _, inst in instances:
        assert set(inst) == set(MLM_NSP)
        assert inst["input_ids"].shape == (SEQ_LEN,) and inst["masked_lm_ids"].shape == (MAX_PRED,)
        assert inst["masked_lm_weights"].dtype == np.float32 and inst["input_ids"].dtype == np.int32
        n = int(inst["input_mask"].sum())
        assert (inst["input_mask"][:n] == 1).all() and (inst["input_ids"][n:] == 0).all()
        ids, seg = inst["input_ids"], inst["segment_ids"]
        seps = np.flatnonzero(ids[:n] == SEP_ID)
        assert ids[0] == CLS_ID and len(seps) == 2 and seps[1] == n - 1
        assert (
            (seg[: seps[0] + 1] == 0).all()
            and (seg[seps[0] + 1 : n] == 1).all()
            and (seg[n:] == 0).all()
        )
        assert seps[0] >= 2 and seps[1] - seps[0] >= 2  # A and B non-empty
        k = int(inst["masked_lm_weights"].sum())
        pos = inst["masked_lm_positions"][:k]
        original = unmask(inst)
        assert (np.diff(pos) > 0).all() and (pos > 0).all() and (pos < n - 1).all()
        assert not np.isin(original[pos], [CLS_ID, SEP_ID]).any()
        assert not np.isin(ids[pos], [CLS_ID, SEP_ID, 0]).any()
        assert k == min(MAX_PRED, max(1, round(n * 0.15)))
        assert (inst["masked_lm_positions"][k:] == 0).all() and (
            inst["masked_lm_ids"][k:] == 0
        ).all()


def test_nsp_pairs_follow_the_reference(corpus_and_instances):
    _, owner, _, instances = corpus_and_instances
    labels = []
    for d, inst in instances:
        original = unmask(inst)
        n = int(inst["input_mask"].sum())
        sep = int(np.flatnonzero(original[:n] == SEP_ID)[0])
        a, b = original[1:sep], original[sep + 1 : n - 1]
        assert all(owner[int(t)][0] == d for t in a), "A always comes from the document"
        # Truncation trims ends only: each side stays a contiguous run of the corpus.
        assert (np.diff(a) == 1).all() and (np.diff(b) == 1).all()
        label = int(inst["next_sentence_label"])
        b_doc = owner[int(b[0])][0]
        if label == 0:
            assert b_doc == d and b[0] > a[-1], "a real next segment follows A in its document"
        else:
            assert b_doc != d, "a random next segment comes from another document"
        labels.append(label)
    positive = 1 - np.mean(labels)
    assert 0.38 < positive < 0.55, positive


def test_unused_segments_are_put_back(corpus_and_instances):
    # After a random B, the chunk's sentences not used as A start the next instance,
    # so (up to truncation at the edges) every sentence of a document is seen.
    docs, owner, _, instances = corpus_and_instances
    seen = set()
    for d, inst in instances:
        original = unmask(inst)
        n = int(inst["input_mask"].sum())
        seen.update(int(t) for t in original[1 : n - 1] if t != SEP_ID and owner[int(t)][0] == d)
    sentences = [s for doc in docs for s in doc]
    covered = np.mean([any(int(t) in seen for t in s) for s in sentences])
    assert covered > 0.9, covered  # about 0.96; without the put-back about 0.73


def test_masking_statistics(corpus_and_instances):
    _, _, config, instances = corpus_and_instances
    predicted = mask = kept = random_ = tokens = 0
    for _, inst in instances:
        w = inst["masked_lm_weights"] > 0
        shown = inst["input_ids"][inst["masked_lm_positions"][w]]
        orig = inst["masked_lm_ids"][w]
        predicted += w.sum()
        mask += (shown == MASK_ID).sum()
        kept += (shown == orig).sum()
        random_ += ((shown != MASK_ID) & (shown != orig)).sum()
        tokens += inst["input_mask"].sum()
        assert (shown[shown != MASK_ID] >= NUM_SPECIAL_TOKENS).all(), "random ids skip specials"
    assert predicted > 2000
    assert abs(predicted / tokens - 0.15) < 0.02
    assert abs(mask / predicted - 0.8) < 0.03
    assert abs(kept / predicted - 0.1) < 0.03
    assert abs(random_ / predicted - 0.1) < 0.03


def test_short_seq_prob_shortens_targets():
    docs, _, vocab = synthetic_corpus(num_docs=30, seed=1)
    lengths = {}
    for p in (0.0, 1.0):
        config = bi.BertInstanceConfig(
            seq_len=SEQ_LEN, max_predictions_per_seq=MAX_PRED, vocab_size=vocab, short_seq_prob=p
        )
        lengths[p] = np.median([inst["input_mask"].sum() for _, inst in make_all(docs, config)])
    assert lengths[0.0] == SEQ_LEN and lengths[1.0] < 0.75 * SEQ_LEN


def test_whole_word_masking_masks_whole_words():
    docs, _, vocab = synthetic_corpus(num_docs=20, seed=2)
    word_start = np.arange(vocab) % 3 == 0  # words of 3 pieces
    word_start[:NUM_SPECIAL_TOKENS] = True
    config = bi.BertInstanceConfig(
        seq_len=SEQ_LEN, max_predictions_per_seq=MAX_PRED, vocab_size=vocab, whole_word_masking=True
    )
    fractions = []
    for _, inst in make_all(docs, config, word_start=word_start):
        original = unmask(inst)
        n = int(inst["input_mask"].sum())
        k = int(inst["masked_lm_weights"].sum())
        masked = set(inst["masked_lm_positions"][:k].tolist())
        special = (original == CLS_ID) | (original == SEP_ID)
        for p in masked:
            if not word_start[original[p]] and not special[p - 1]:
                assert p - 1 in masked, "a continuation piece is masked with its word start"
            if p + 1 < n and not special[p + 1] and not word_start[original[p + 1]]:
                assert p + 1 in masked, "a word is masked up to its last piece"
        fractions.append(k / n)
    assert 0.12 < np.mean(fractions) < 0.16


def test_bad_settings_fail_with_the_field_name():
    with pytest.raises(
        ValueError, match=r"data.seq_len=4 is too small for \[CLS\] A \[SEP\] B \[SEP\].*>= 5"
    ):
        bi.BertInstanceConfig(seq_len=4, max_predictions_per_seq=1, vocab_size=100)
    with pytest.raises(ValueError, match="data.max_predictions_per_seq=30"):
        bi.BertInstanceConfig(seq_len=32, max_predictions_per_seq=30, vocab_size=100)
    with pytest.raises(ValueError, match="data.masked_lm_prob=0"):
        bi.BertInstanceConfig(
            seq_len=32, max_predictions_per_seq=5, vocab_size=100, masked_lm_prob=0.0
        )
    # The smallest legal length works: [CLS] a [SEP] b [SEP].
    config = bi.BertInstanceConfig(seq_len=5, max_predictions_per_seq=1, vocab_size=100)
    docs = [(np.array([7, 8], np.int32), np.array([9], np.int32))]
    out = bi.create_instances_from_document(
        docs[0], lambda r: docs[0], np.random.default_rng(0), config
    )
    assert all(inst["input_mask"].sum() == 5 for inst in out)
