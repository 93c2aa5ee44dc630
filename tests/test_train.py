"""End to end: tiny BERT and causal LM train through `loop.run` (the code path of
train.py), one-step golden metrics per parametrization, checkpoints across meshes."""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from tests.helpers import run, tiny
from unit_scaling.train import checkpoint, loop, tasks, trainer as trainer_lib


@pytest.mark.parametrize("objective", ["mlm_nsp", "causal_lm"])
def test_tiny_models_learn(objective, tmp_path):
    rows = run(tiny(objective, steps=30), tmp_path)
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3, losses


# One step of each parametrization from the same seed and batch: loss and the RMS of
# the gradients, parameters and updates. Update these ONLY for an intended change of
# numerics (a new rule, init or op), and say why in the commit.
GOLDEN = {
    "sp": {"train/loss": 7.61516571, "train/grad_norm": 1.15432632,
           "train/param_rms": 0.0625931844, "train/update_rms": 0.00298300455},
    "unit": {"train/loss": 8.199593544006348, "train/grad_norm": 368.2386169433594,
             "train/param_rms": 0.9814955592155457, "train/update_rms": 0.030027901753783226},
    "umup": {"train/loss": 7.612810134887695, "train/grad_norm": 399.0008850097656,
             "train/param_rms": 0.9962486028671265, "train/update_rms": 0.22470508515834808},
}
# How far these move with the machine: `python tests/golden_spread.py` reruns them
# under AVX512 / AVX2 / SSE4.2 code paths, single-threaded Eigen and two device
# meshes (other sum orders, as another CPU or XLA version gives). Every metric moved
# by at most 1.7e-7 relative (2026-11-30, AMD EPYC; sp/unit as here, umup before its
# post-norm taus moved to a reference width, commit 82df2fe). 1e-5 leaves ~100x for other XLA
# versions' fusion and reduction orders, and is 1000x below the 1% change a wrong
# scale makes. (Before the attention key bias was dropped, its zero-in-theory
# gradient was float noise that Adam turned into full-size updates: update_rms then
# moved by 1e-4 between Intel and AMD.)
GOLDEN_RTOL = 1e-5


@pytest.mark.parametrize("param", ["sp", "unit", "umup"])
def test_one_step_golden_metrics(param, tmp_path):
    (row,) = run(tiny(param=param, steps=1), tmp_path)
    got = {k: row[k] for k in ("train/loss", "train/grad_norm", "train/param_rms", "train/update_rms")}
    print(param, json.dumps(got))
    for key, expected in GOLDEN[param].items():
        assert got[key] == pytest.approx(expected, rel=GOLDEN_RTOL), (
            f"{param} {key}: {got[key]} != golden {expected}. If this change of numerics is "
            "intended, update GOLDEN in tests/test_train.py and say why in the commit.")


def test_checkpoint_from_8_devices_restores_on_4_and_1(tmp_path):
    config = tiny(steps=2, checkpoint_every=2)
    config.mesh.update(data=2, fsdp=2, tensor=2)
    run(config, tmp_path)
    config.mesh.update(data=1, fsdp=-1, tensor=1)
    for devices in (4, 1):
        trainer = trainer_lib.build(config, devices=jax.devices()[:devices])
        trainer.close()
        ckpt = checkpoint.Checkpointer(os.path.join(tmp_path, "checkpoints"),
                                       json.loads(config.to_json_best_effort()), every=0, keep=2)
        state, data_state, step = ckpt.restore(trainer.abstract_state())
        ckpt.close()
        assert step == 2 and data_state
        for path, leaf in jax.tree_util.tree_leaves_with_path(state):
            assert leaf.sharding.mesh.devices.size == devices, jax.tree_util.keystr(path)


def test_finetune_from_pretraining_run(tmp_path):
    pretrain = tiny(steps=2, checkpoint_every=2)
    run(pretrain, tmp_path / "pretrain")
    config = tiny(steps=3, eval_every=3, eval_batches=2)
    config.data.objective = "classification"
    config.data.task = "kjv_testament"
    config.init_from = str(tmp_path / "pretrain")
    task = tasks.make_task(config)
    params = task.model.init({"params": jax.random.key(1)}, next(task.train_batches),
                             deterministic=True)["params"]
    loaded = task.init_params(nn.unbox(params))
    stored = tasks.load_encoder(str(tmp_path / "pretrain"), nn.unbox(params))
    np.testing.assert_array_equal(
        loaded["encoder"]["token_embed"]["embedding"], stored["encoder"]["token_embed"]["embedding"])
    task.close()
    rows = run(config, tmp_path / "finetune")
    evals = [r for r in rows if "eval/accuracy" in r]
    assert evals and evals[-1]["eval/majority_baseline"] == pytest.approx(0.702, abs=0.01)
    other = tiny(steps=1)
    other.data.objective, other.data.task = "classification", "kjv_testament"
    other.model.d_model = 64
    other.init_from = str(tmp_path / "pretrain")
    with pytest.raises(ValueError, match="encoder shapes differ"):
        run(other, tmp_path / "mismatch")
    # Fine-tuning takes the pretraining run's tokenizer; another one is refused, naming both.
    assert task.tokenizer.model_proto == (tmp_path / "pretrain" / "tokenizer.model").read_bytes()
    from unit_scaling.data import corpora, tokenizer as tokenizer_lib

    foreign = tokenizer_lib.train_tokenizer(
        tokenizer_lib.sample_sentences(corpora.load_corpus("kjv:Ruth"), 500), kind="bpe", vocab_size=300)
    (tmp_path / "foreign.model").write_bytes(foreign.model_proto)
    config.data.tokenizer_path = str(tmp_path / "foreign.model")
    with pytest.raises(ValueError, match=r"foreign.model.* is not the tokenizer of config.init_from"):
        tasks.make_task(config)
    config.data.tokenizer_path = ""
    config.init_from = str(tmp_path / "nowhere")
    with pytest.raises(OSError, match="does not exist"):
        tasks.make_task(config)


def test_generate_from_causal_run(tmp_path, monkeypatch):
    from unit_scaling import generate
    from unit_scaling.data import tokenizer as tokenizer_lib

    run(tiny("causal_lm", steps=2, checkpoint_every=2), tmp_path)
    kept = (tmp_path / "tokenizer.model").read_bytes()  # the run keeps its tokenizer
    # From now on no tokenizer may be trained or taken from the cache: resuming and
    # generating use the workdir's copy.
    monkeypatch.setattr(tokenizer_lib, "load_or_train_tokenizer",
                        lambda *a, **k: pytest.fail("the tokenizer was not the workdir's"))
    rows = run(tiny("causal_lm", steps=3, checkpoint_every=2, allow_resume_changes=True), tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    model, params, tokenizer, _ = generate.load_run(str(tmp_path))
    assert tokenizer.model_proto == kept
    from unit_scaling.models import causal_lm

    new = causal_lm.generate(model, params, np.full((2, 3), 2, np.int32), 5,
                             jax.random.key(0), temperature=0.0)
    assert new.shape == (2, 5) and np.all(np.asarray(new[0]) == np.asarray(new[1]))
    assert isinstance(tokenizer.decode(np.asarray(new[0]).tolist()), str)
    with pytest.raises(ValueError, match="max_new_tokens=0 must be >= 1"):
        generate.check_lengths(4, 0, model.config.max_len)
    with pytest.raises(ValueError, match=r"the prompt may be at most 246 tokens"):
        generate.check_lengths(300, 10, 256)
