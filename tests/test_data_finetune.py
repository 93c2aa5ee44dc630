"""Fine-tuning data: KJV tasks (labels, balance, held-out chapters), GLUE via tfds."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tests.helpers import small_bert_config
from unit_scaling.batches import CLASSIFICATION
from unit_scaling.data import corpora, finetune
from unit_scaling.data.tokenizer import CLS_ID, SEP_ID


def test_kjv_tasks_labels_balance_and_held_out_chapters():
    train, names = finetune.load_task("kjv_books", "train")
    held_out, _ = finetune.load_task("kjv_books", "eval")
    assert names == finetune.KJV_BOOKS
    # The class balance documented in finetune.py.
    assert finetune.class_counts(train, 5).tolist() == [1424, 2277, 769, 1159, 1029]
    assert finetune.class_counts(held_out, 5).tolist() == [109, 184, 146, 133, 42]
    assert not {t for t, _, _ in train} & {t for t, _, _ in held_out} - {"Amen."}
    kjv = corpora.load_corpus("kjv")
    genesis_1 = set(kjv[0].sentences)
    assert all(label == 0 for text, _, label in train + held_out if text in genesis_1)
    testament, names = finetune.load_task("kjv_testament", "train")
    assert names == ("OT", "NT") and finetune.class_counts(testament, 2).tolist() == [20980, 7040]


def test_encode_example_pairs_and_truncation():
    _, info = finetune.make_finetune_pipeline(
        small_bert_config(), "kjv_books", "eval", process_index=0, process_count=1
    )
    tok = info.tokenizer
    row = finetune.encode_example(tok, "In the beginning", "God created", 16)
    n_a, n_b = len(tok.encode("In the beginning")), len(tok.encode("God created"))
    ids, seg = row["input_ids"], row["segment_ids"]
    assert ids[0] == CLS_ID and ids[1 + n_a] == SEP_ID and ids[2 + n_a + n_b] == SEP_ID
    assert seg.tolist() == [0] * (2 + n_a) + [1] * (n_b + 1) + [0] * (16 - 3 - n_a - n_b)
    long = finetune.encode_example(tok, "word " * 40, "another " * 3, 12)
    assert long["input_mask"].sum() == 12 and long["input_ids"][-1] == SEP_ID
    assert (long["segment_ids"] == 1).sum() == len(tok.encode("another " * 3)) + 1
    with pytest.raises(ValueError, match="data.seq_len=4 is too small"):
        finetune.encode_example(tok, "a", "b", 4)


def test_eval_pass_covers_each_example_once_over_processes():
    config = small_bert_config()
    seen, batches = [], []
    for p in range(2):
        iterator, info = finetune.make_finetune_pipeline(
            config, "kjv_books", "eval", process_index=p, process_count=2
        )
        got = list(iterator)
        batches.append(len(got))
        for b in got:
            assert b["input_ids"].shape == (8, 64) and b["label"].dtype == np.int32
            real = b["weight"] > 0
            assert (b["input_mask"][~real] == 0).all(), "padding rows are empty"
            seen.extend(zip(b["label"][real].tolist(), b["input_ids"][real][:, 1].tolist()))
    assert batches[0] == batches[1] == info.num_batches  # same step count on each process
    assert len(seen) == info.num_examples == 614
    assert np.bincount([label for label, _ in seen]).tolist() == [109, 184, 146, 133, 42]


def test_train_pipeline_is_shuffled_and_deterministic():
    config = small_bert_config()
    a, info = finetune.make_finetune_pipeline(
        config, "kjv_testament", "train", process_index=0, process_count=1
    )
    b, _ = finetune.make_finetune_pipeline(
        config, "kjv_testament", "train", process_index=0, process_count=1
    )
    first, second = next(a), next(b)
    assert all(np.array_equal(first[k], second[k]) for k in first)
    assert set(first) == set(CLASSIFICATION) and (first["weight"] == 1).all()
    assert 0 < first["label"].mean() < 1  # shuffled: both testaments in the first batch
    assert info.num_classes == 2
    a.close()
    b.close()


@pytest.mark.parametrize("task, classes", [("glue/sst2", 2), ("glue/mnli", 3)])
def test_glue_through_tfds_mock_data(task, classes):
    with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
        iterator, info = finetune.make_finetune_pipeline(
            small_bert_config(), task, "eval", process_index=0, process_count=1
        )
        batches = list(iterator)
    assert info.num_classes == classes and info.num_batches == len(batches) == 2
    labels = np.concatenate([b["label"][b["weight"] > 0] for b in batches])
    assert len(labels) == 24 and labels.min() >= 0 and labels.max() < classes
    has_b = [(b["segment_ids"].sum(axis=1) > 0)[b["weight"] > 0] for b in batches]
    assert np.concatenate(has_b).all() == (task == "glue/mnli")


def test_unknown_task_and_unprepared_glue(tmp_path):
    with pytest.raises(ValueError, match="task 'kjv_chapters' is unknown.*kjv_books"):
        finetune.load_task("kjv_chapters", "train")
    with pytest.raises(
        corpora.TfdsNotPreparedError, match=r"task='tfds:glue/sst2:train'.*not prepared"
    ):
        finetune.load_task("glue/sst2", "train", tfds_data_dir=str(tmp_path))


def test_too_short_seq_len_fails_before_any_data_is_read(monkeypatch):
    # The objective's validate runs first: no corpus is loaded, no tokenizer trained.
    monkeypatch.setattr(finetune, "load_task", lambda *a, **k: pytest.fail("data was read"))
    with pytest.raises(ValueError, match=r"data.seq_len=2 is too small for \[CLS\] A \[SEP\]"):
        finetune.make_finetune_pipeline(
            small_bert_config(seq_len=2), "kjv_books", "train", process_index=0, process_count=1
        )
