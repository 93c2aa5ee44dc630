"""The import rules of docs/architecture.md: each package of `unit_scaling` imports
only the packages its row of the table lists (read from the page itself), so imports
flow downward and the page stays true. `_extras` (the optional-dependency check) is
open to every package, as the page says. Also two rules of #13: no file over 450 lines,
and no test module importing another."""

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "unit_scaling"


def allowed_imports() -> dict[str, set[str]]:
    """{package: packages it may import} from the page's table (`the rows above`: every
    package of an earlier row; `anything above`: all of them)."""
    rows = re.findall(r"^\| (`.+?`) \| (.+?) \|$", (ROOT / "docs/architecture.md").read_text(), re.M)
    allowed, above = {}, set()
    for names, deps in rows:
        packages = re.findall(r"`(\w+)`", names)
        may = set(re.findall(r"`(\w+)`", deps))
        if "the rows above" in deps or "anything above" in deps:
            may |= above
        for package in packages:
            allowed[package] = may
        above |= set(packages)
    return allowed


def imported_packages(path: pathlib.Path) -> set[str]:
    """The top-level `unit_scaling` packages a file imports (`from unit_scaling import
    x` counts as importing `x`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] != "unit_scaling":
                continue
            found |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names
                      if a.name.startswith("unit_scaling.")}
    return found


def test_the_table_covers_every_package():
    top = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
           if (p.suffix == ".py" or (p / "__init__.py").exists()) and p.name != "__init__.py"}
    assert top == set(allowed_imports()), "add the package to docs/architecture.md's table"


def test_imports_flow_downward():
    allowed = allowed_imports()
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.name == "__init__.py" and len(rel.parts) == 1:
            continue  # the package's own __init__ re-exports the primitives
        package = rel.parts[0].removesuffix(".py")
        for other in imported_packages(path) - {package, "_extras"} - allowed[package]:
            wrong.append(f"unit_scaling/{rel} imports {other}")
    assert not wrong, "imports that docs/architecture.md does not allow:\n" + "\n".join(wrong)


def test_allowed_table_is_acyclic():
    allowed = allowed_imports()
    order, seen = [], set()

    def visit(package, stack):
        assert package not in stack, f"cycle: {' -> '.join(stack + (package,))}"
        if package not in seen:
            for dep in sorted(allowed.get(package, ())):
                visit(dep, stack + (package,))
            seen.add(package)

    for package in allowed:
        visit(package, ())


def test_no_file_over_450_lines():
    """#13's size rule: a file that outgrows it holds two concepts; split it."""
    long = [f"{p.relative_to(ROOT)}: {n} lines" for p in sorted(PACKAGE.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > 450]
    assert not long, "\n".join(long)


def test_no_test_module_imports_another():
    """Tests share code through conftest.py and tests/helpers.py, never by importing a
    test module (which would collect and run its tests twice)."""
    wrong = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
                     if isinstance(node, ast.ImportFrom) else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            if any(n.split(".")[-1].startswith("test_") for n in names):
                wrong.append(f"{path.name} imports {names}")
    assert not wrong, "\n".join(wrong)
