r"""Fine-tuning BERT for sequence classification, from a pretraining run.

  python train.py --config configs/finetune.py:kjv_books \
      --config.init_from=runs/bert-tiny --workdir runs/bert-tiny-kjv

`arg` is a comma list `TASK[,size=tiny][,param=...][,precision=...][,seed=N]`; TASK
one of kjv_books (which of five books a verse is from; majority class 30% of eval),
kjv_testament (Old or New Testament; majority 70%), glue/sst2, glue/mnli (prepared
tfds `glue`). size, param and the data fields must match the pretraining run so the
encoder and tokenizer fit (configs/bert.py:SIZE with the same arguments). Without
init_from the model trains from scratch: the baseline that pretraining should beat.
The run logs eval/accuracy next to eval/majority_baseline.
"""

import pathlib
import sys

import ml_collections

try:
    from configs import bert, common
except ImportError:  # loaded by path from outside the repository root
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
    from configs import bert, common


# Peak learning rates for fine-tuning, per parametrization.
LR = {"sp": 1e-4, "unit": 3e-3, "umup": 0.1}


def get_config(arg: str = "kjv_books") -> ml_collections.ConfigDict:
    """The config for `arg` (see the module docstring)."""
    args = common.parse_arg(arg, task="kjv_books", size="tiny", seed=0, param="sp",
                            precision="fp32")
    config = bert.get_config(
        f"{args.size},seed={args.seed},param={args.param},precision={args.precision}")
    config.data.objective = "classification"
    config.data.task = args.task
    config.train.update(steps=300, global_batch_size=32, log_every=25, eval_every=100,
                        eval_batches=1000, checkpoint_every=0)
    config.train.lr = common.select_preset(LR, args.param, "param")
    return config
