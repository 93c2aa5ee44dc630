"""The light install: the required dependencies, and the core working with Flax, the
training stack and matplotlib absent (a meta-path hook blocks their import)."""

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKED = ("flax", "tensorflow_datasets", "grain", "orbax", "tensorflow", "matplotlib")

CORE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys

    BLOCKED = {blocked!r}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked for the test: {{name}}")
            return None

    sys.meta_path.insert(0, Block())

    import jax, jax.numpy as jnp, optax
    import unit_scaling
    import unit_scaling.functional as U
    from unit_scaling import formats, optim, scale
    from unit_scaling.analysis import track_scales

    k = jax.random.split(jax.random.key(0), 3)
    params = {{"w": jax.random.normal(k[0], (16, 32)), "g": jnp.ones(32),
               "out": jax.random.normal(k[1], (32, 10))}}
    x, labels = jax.random.normal(k[2], (8, 16)), jnp.arange(8) % 10

    def loss(p, x):
        h = U.rms_norm(U.gelu(U.linear(x, p["w"], formats=formats.FP8)), p["g"])
        return U.cross_entropy(U.linear_readout(h, p["out"]), labels)

    grads = jax.jit(jax.grad(loss))(params, x)
    spec = {{"w": ("weight", None, None), "g": ("norm", None, None), "out": ("output", None, None)}}
    tx = optax.chain(optax.adam(0.1), optim.scale_by_parametrization(params, "umup", spec=spec))
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    assert optim.lr_table(params, spec=spec)["w"] == 16 ** -0.5
    records = track_scales(loss)(params, x)
    assert any(r.op == "U.linear" for r in records), records
    for name, extra in [("unit_scaling.nn", "flax"), ("unit_scaling.parametrization", "flax"),
                        ("unit_scaling.train", "train")]:
        try:
            __import__(name)
        except ImportError as e:
            assert f'unit-scaling-jax[{{extra}}]' in str(e), str(e)
        else:
            raise AssertionError(name + " imported without its extra")
    try:
        from unit_scaling.analysis import plot_scales
    except ImportError as e:
        assert "unit-scaling-jax[analysis]" in str(e), str(e)
    else:
        raise AssertionError("plot_scales imported without matplotlib")
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not loaded, loaded
    print("core ok", len(records))
    """
)


def test_core_runs_without_flax_training_stack_or_matplotlib():
    script = CORE_SCRIPT.format(blocked=BLOCKED)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "core ok" in result.stdout


def _pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _name(requirement):
    for sep in "<>=!~;[ ":
        requirement = requirement.split(sep)[0]
    return requirement.strip().lower().replace("_", "-")


def test_required_dependencies_are_the_core_and_the_rest_are_extras():
    project = _pyproject()["project"]
    assert sorted(map(_name, project["dependencies"])) == ["jax", "ml-dtypes", "numpy", "optax"]
    extras = project["optional-dependencies"]
    assert set(extras) >= {"flax", "analysis", "train", "all", "dev"}
    assert "flax" in map(_name, extras["flax"]) and "matplotlib" in map(_name, extras["analysis"])
    train = set(map(_name, extras["train"]))
    assert {"orbax-checkpoint", "grain", "tensorflow-datasets", "unit-scaling-jax"} <= train
    assert {"equinox", "pdoc", "pytest", "transformers"} <= set(map(_name, extras["dev"]))
    assert "safetensors" in map(_name, extras["export"])
    assert extras["all"] == ["unit-scaling-jax[flax,analysis,train,export]"]


def test_metadata_version_license_and_typing():
    import unit_scaling

    pyproject = _pyproject()
    assert pyproject["project"]["dynamic"] == ["version"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "unit_scaling.__version__"}
    assert unit_scaling.__version__.count(".") == 2
    assert pyproject["project"]["license"] == "Apache-2.0"
    with open(os.path.join(ROOT, "LICENSE")) as f:
        text = f.read()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert os.path.exists(os.path.join(ROOT, "unit_scaling", "py.typed"))
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["unit_scaling"]
    assert not os.path.exists(os.path.join(ROOT, "setup.py"))  # one place for the metadata
    with open(os.path.join(ROOT, "Makefile")) as f:
        makefile = f.read()
    assert "$(VENV)/.installed: pyproject.toml" in makefile and '".[all,dev]"' in makefile


@pytest.mark.parametrize("module", ["unit_scaling.functional", "unit_scaling.scale",
                                    "unit_scaling.formats", "unit_scaling.formats.quantisation",
                                    "unit_scaling.formats.policy", "unit_scaling.optim"])
def test_public_modules_declare_all(module):
    import importlib

    mod = importlib.import_module(module)
    assert mod.__all__ and all(hasattr(mod, name) for name in mod.__all__)
    assert not {"jax", "jnp", "np", "optax"} & set(mod.__all__)
    public = {n for n, v in vars(mod).items() if callable(v) and not n.startswith("_")
              and getattr(v, "__module__", None) == module}
    assert public <= set(mod.__all__), public - set(mod.__all__)


def test_dir_lists_the_public_api():
    import unit_scaling.functional as U

    assert "jnp" not in dir(U) and "np" not in dir(U) and "linear" in dir(U)
