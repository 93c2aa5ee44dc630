"""How much the one-step golden metrics of tests/test_train.py vary with the machine.

Not a test: the script that chose GOLDEN_RTOL. A CPU of another vendor or an XLA of
another version changes the order of float sums (vector width, instruction set,
thread partitioning of the GEMMs, the collectives of the mesh), not the maths. This
script emulates those differences on one machine and prints each metric's largest
relative deviation from the first variant:

  python tests/golden_spread.py            # about 5 minutes on 2 cores

Variants: XLA's `--xla_cpu_max_isa` (AVX512 / AVX2 / SSE4_2, i.e. a Zen 2 vs a
Sapphire Rapids code path), single-threaded Eigen, and two device meshes (data=8 and
data/fsdp/tensor=2x2x2, which reorders every reduction).
"""

import json
import os
import subprocess
import sys

FLAG_VARIANTS = {
    "native": "",
    "avx2": "--xla_cpu_max_isa=AVX2",
    "sse4": "--xla_cpu_max_isa=SSE4_2",
    "one_thread": "--xla_cpu_multi_thread_eigen=false",
}
MESHES = {"data8": dict(data=8, fsdp=1, tensor=1), "2x2x2": dict(data=2, fsdp=2, tensor=2)}
METRICS = ("train/loss", "train/grad_norm", "train/param_rms", "train/update_rms")


def child(flags_name: str) -> None:
    """Runs every parametrization on every mesh in this process; prints JSON rows."""
    import tempfile

    import tests.conftest  # noqa: F401  (8 forced CPU devices, like the suite)
    from tests.helpers import run, tiny

    for param in ("sp", "unit", "umup"):
        for mesh_name, mesh in MESHES.items():
            config = tiny(param=param, steps=1)
            config.mesh.update(mesh)
            with tempfile.TemporaryDirectory() as workdir:
                (row,) = run(config, workdir)
            print("ROW", json.dumps(dict(variant=f"{flags_name}/{mesh_name}", param=param,
                                         **{k: row[k] for k in METRICS})), flush=True)


def main() -> None:
    rows = []
    for name, flags in FLAG_VARIANTS.items():
        env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
        out = subprocess.run([sys.executable, __file__, "--child", name], env=env,
                             capture_output=True, text=True, check=True).stdout
        rows += [json.loads(line[4:]) for line in out.splitlines() if line.startswith("ROW ")]
    for param in ("sp", "unit", "umup"):
        mine = [r for r in rows if r["param"] == param]
        print(param)
        for metric in METRICS:
            ref = mine[0][metric]
            spread = max(abs(r[metric] - ref) / abs(ref) for r in mine)
            worst = max(mine, key=lambda r: abs(r[metric] - ref))["variant"]
            print(f"  {metric:18s} {ref:.9g}  max rel deviation {spread:.2e} ({worst})")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2])
    else:
        main()
