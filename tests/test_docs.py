"""The API reference (`make docs`): pdoc builds a page per public module, the op table
comes from the code, and a broken reference fails the build."""

import importlib.util
import os
import subprocess
import sys
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _api():
    spec = importlib.util.spec_from_file_location("docs_api", os.path.join(ROOT, "docs", "api.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_docs_builds_a_page_per_public_module_with_the_op_table(tmp_path):
    pytest.importorskip("pdoc")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, "docs/api.py", str(tmp_path)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    for module in ("scale", "functional", "formats", "optim", "analysis", "parametrization", "nn"):
        assert (tmp_path / "unit_scaling" / f"{module}.html").exists(), module
    assert (tmp_path / "index.html").exists()
    page = (tmp_path / "unit_scaling" / "functional.html").read_text()
    assert "The ops (generated from the code)" in page and "vmap_reduction" in page
    assert not (tmp_path / "unit_scaling" / "train.html").exists()  # an application, not API


def test_op_table_covers_every_op_from_its_signature_and_docstring():
    import unit_scaling.functional as U

    api = _api()
    table = api.op_table()
    ops = [n for n in U.__all__ if n not in api.NOT_OPS]
    rows = {line.split("`")[1]: line for line in table.splitlines()[2:]}
    assert sorted(rows) == sorted(ops)
    assert "`'to_output_scale'`" in rows["matmul"] and "k^-1/2" in rows["matmul"]
    assert rows["linear"].count("^-1/2") >= 3  # scale_power's default, read from the code
    assert rows["linear_readout"].endswith("| `None` |")
    assert "g_table = (V / ids.size)^1/2" in rows["embedding"]


def test_a_broken_reference_is_reported():
    api = _api()

    def documented():
        """See `U.linear`, `scale.vmap_reduction`, `U.no_such_op` and `optim.nothing`."""

    fake = types.ModuleType("fake_module", "Uses `unit_scaling.functional.linear`.")
    documented.__module__ = "fake_module"
    fake.documented = documented
    assert api.broken_references([fake]) == ["fake_module: U.no_such_op", "fake_module: optim.nothing"]
