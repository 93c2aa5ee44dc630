"""`python -m unit_scaling.export --workdir RUN --out DIR [--step N]`."""

import json
import os

from absl import app, flags

from unit_scaling import errors
from unit_scaling.export.io import CONFIG, export_run


def _main(argv):
    del argv
    f = flags.FLAGS
    out = export_run(f.workdir, f.out, f.step)
    with open(os.path.join(out, CONFIG)) as fp:
        meta = json.load(fp)
    print(f"wrote {out}: {meta['architectures'][0]} ({meta['unit_scaling']['param']}, "
          f"step {meta['unit_scaling']['step']})")
    for note in meta["unit_scaling"]["notes"]:
        print(f"note: {note}")


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "A BERT or causal-LM training run.", required=True)
    flags.DEFINE_string("out", None, "The directory to write the export to.", required=True)
    flags.DEFINE_integer("step", None, "The checkpoint to export (default: the latest).")
    app.run(errors.reported(_main), flags_parser=errors.flags_parser)
