"""configs/common.py parse_arg and the data sections of configs/bert.py, causal_lm.py."""

import pytest

from configs import common
from configs.common import load_config


def test_parse_arg_types_flags_and_preset():
    args = common.parse_arg(
        "base, seed=3,lr=0.5,fp8,name=x", size="tiny", seed=0, lr=1.0, fp8=False, name=""
    )
    assert dict(args) == {"size": "base", "seed": 3, "lr": 0.5, "fp8": True, "name": "x"}
    assert isinstance(args.seed, int) and isinstance(args.lr, float)
    assert common.parse_arg("fp8=no", size="tiny", fp8=True).fp8 is False
    assert dict(common.parse_arg("", size="tiny", seed=0)) == {"size": "tiny", "seed": 0}
    assert dict(common.parse_arg(None, size="tiny")) == {"size": "tiny"}


def test_parse_arg_errors_name_the_key():
    with pytest.raises(ValueError, match=r"unknown key 'sede'.*valid keys: size, seed"):
        common.parse_arg("tiny,sede=1", size="tiny", seed=0)
    with pytest.raises(ValueError, match=r"seed='x'.*int"):
        common.parse_arg("seed=x", size="tiny", seed=0)
    with pytest.raises(ValueError, match="more than one bare word"):
        common.parse_arg("tiny,base", size="tiny", seed=0)
    with pytest.raises(ValueError, match="fp8='maybe'"):
        common.parse_arg("fp8=maybe", size="tiny", fp8=False)


@pytest.mark.parametrize("size", ["tiny", "mini", "small", "medium", "base", "large"])
def test_bert_presets_have_every_data_field(size):
    config = load_config(f"configs/bert.py:{size}")
    data = config.data
    for field in (
        "corpus",
        "tokenizer",
        "tokenizer_path",
        "vocab_size",
        "seq_len",
        "max_predictions_per_seq",
        "masked_lm_prob",
        "short_seq_prob",
        "whole_word_masking",
        "eval_fraction",
        "eval_split",
        "num_workers",
        "prefetch",
        "tfds_data_dir",
        "shuffle_window",
    ):
        assert field in data, field
    assert data.objective == "mlm_nsp" and data.corpus == "kjv" and data.num_workers == 0
    assert config.train.global_batch_size % 8 == 0 and isinstance(config.seed, int)
    assert data.max_predictions_per_seq <= data.seq_len - 3


@pytest.mark.parametrize("size", ["tiny", "125m", "350m", "760m", "1.3b"])
def test_causal_presets_have_every_data_field(size):
    config = load_config(f"configs/causal_lm.py:{size}")
    for field in (
        "corpus",
        "tokenizer",
        "vocab_size",
        "seq_len",
        "eval_fraction",
        "num_packing_bins",
        "num_workers",
        "prefetch",
    ):
        assert field in config.data, field
    assert config.data.objective == "causal_lm"


def test_tiny_defaults_and_arg_overrides():
    bert = load_config("configs/bert.py:tiny")
    assert (
        bert.data.vocab_size,
        bert.data.seq_len,
        bert.data.max_predictions_per_seq,
        bert.train.global_batch_size,
    ) == (4096, 64, 10, 64)
    causal = load_config("configs/causal_lm.py:tiny")
    assert (causal.data.seq_len, causal.train.global_batch_size) == (128, 16)
    custom = load_config("configs/bert.py:mini,seed=7,corpus=kjv:nt")
    assert (custom.size, custom.seed, custom.data.corpus) == ("mini", 7, "kjv:nt")
    assert load_config("configs/bert.py").size == "tiny"


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match="huge.*tiny, mini, small, medium, base, large"):
        load_config("configs/bert.py:huge")
    with pytest.raises(ValueError, match="valid keys: size, seed, corpus"):
        load_config("configs/causal_lm.py:tiny,batch=3")
