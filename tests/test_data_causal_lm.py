"""Causal LM: document pieces, packing invariants, completeness over processes."""

import collections

import numpy as np
import pytest

from tests.helpers import small_causal_config, take
from unit_scaling.batches import CAUSAL_LM
from unit_scaling.data import causal_lm_packing as clm, corpora, pipeline, splits, stats
from unit_scaling.data import tokenizer as tok
from unit_scaling.data.tokenizer import CLS_ID, SEP_ID


def test_document_pieces_never_cross_the_document():
    sentences = [np.arange(10, 17, dtype=np.int32), np.arange(17, 20, dtype=np.int32)]  # 10 tokens
    pieces = clm.document_pieces(sentences, seq_len=4)
    inputs = np.concatenate([p["input_ids"] for p in pieces])
    targets = np.concatenate([p["targets"] for p in pieces])
    assert [len(p["input_ids"]) for p in pieces] == [4, 4, 3]
    assert inputs.tolist() == [CLS_ID, *range(10, 20)]
    assert targets.tolist() == [*range(10, 20), SEP_ID]
    assert clm.document_pieces([], seq_len=4) == []


def test_packed_rows_keep_documents_apart():
    iterator, info = pipeline.make_pretraining_pipeline(
        small_causal_config(), process_index=0, process_count=1
    )
    batches = take(iterator, 6)
    iterator.close()
    assert info.element_spec == {k: (v.shape, v.dtype) for k, v in batches[0].items()}
    assert info.bos_id == CLS_ID and info.eos_id == SEP_ID
    for batch in batches:
        assert set(batch) == set(CAUSAL_LM) and batch["input_ids"].shape == (8, 64)
        np.testing.assert_array_equal(batch["weights"], batch["segment_ids"] > 0)
        for row in range(8):
            seg = batch["segment_ids"][row]
            pad = seg == 0
            assert (batch["input_ids"][row][pad] == 0).all() and (
                batch["targets"][row][pad] == 0
            ).all()
            for s in np.unique(seg[~pad]):
                where = np.flatnonzero(seg == s)
                assert (np.diff(where) == 1).all(), "a piece is contiguous in its row"
                np.testing.assert_array_equal(batch["positions"][row][where], np.arange(len(where)))
                inputs, targets = batch["input_ids"][row][where], batch["targets"][row][where]
                # Inside a piece the target is the next input: no target from elsewhere.
                np.testing.assert_array_equal(targets[:-1], inputs[1:])
                assert SEP_ID not in inputs and CLS_ID not in targets
                assert CLS_ID not in inputs[1:], "a document starts only at a piece start"


def test_shards_together_cover_every_token_once():
    # One epoch of the (small) eval split on 2 processes: together the packed rows hold
    # exactly [CLS] + the tokens of every eval document, each once.
    config = small_causal_config(eval_fraction=0.1)
    per_process = []
    for p in range(2):
        dataset, _ = pipeline.make_pretraining_dataset(
            config, "eval", process_index=p, process_count=2, num_epochs=1
        )
        per_process.append(
            collections.Counter(
                int(t) for row in dataset for t in row["input_ids"][row["segment_ids"] > 0]
            )
        )
    corpus = corpora.load_corpus(config.data.corpus)
    tokenizer = tok.tokenizer_from_config(config.data, corpus)
    expected = collections.Counter()
    for d in splits.split_documents(len(corpus), "eval", 0.1):
        expected[CLS_ID] += 1
        for ids in tokenizer.encode_many(corpus[int(d)].sentences):
            expected.update(ids.tolist())
    assert per_process[0] and per_process[1], "both processes get data"
    assert per_process[0] + per_process[1] == expected


def test_packing_statistics_and_seq_len_check():
    iterator, _ = pipeline.make_pretraining_pipeline(
        small_causal_config(), process_index=0, process_count=1
    )
    result, _ = stats.measure(iterator, "causal_lm", 20)
    iterator.close()
    assert result["packing_efficiency"] > 0.95  # KJV chapters are long: most pieces are full
    assert abs(result["padding_fraction"] + result["packing_efficiency"] - 1) < 1e-9
    assert 0 < result["eos_fraction"] < 0.05 and result["segments_per_row"] >= 1
    with pytest.raises(ValueError, match=r"data.seq_len=1 is too small.*\[CLS\].*>= 2"):
        pipeline.make_pretraining_pipeline(
            small_causal_config(seq_len=1), process_index=0, process_count=1
        )
