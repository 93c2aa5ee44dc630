"""Builds the API reference: static HTML from the docstrings (pdoc), one page per public
module, with the op table of `unit_scaling.functional` generated from the code.

    python docs/api.py [OUT_DIR]        # default build/docs/api; `make docs` runs it

The op table reads every op's signature (the default `constraint`) and the `Forward`,
`Backward` and `Constraint` statements of its docstring, the one place each scaling rule
is written, and is added to the functional page. The build fails (exit status 1) when a
docstring names an object of the package that does not exist (`U.name`,
`unit_scaling.module.name`, `scale.name`, ...) or a page links to a missing page.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The public modules (their submodules are walked too). The trainer, the data pipeline
# and the generation CLI are applications, documented in the README.
MODULES = ["unit_scaling", r"!unit_scaling\.(train|data|generate|_)"]  # "!": a regex
# Functions of `functional` that are helpers, not ops with scales.
NOT_OPS = {"ATTENTION_IMPLEMENTATIONS", "attention_core", "attention_mask",
           "attention_output_scale", "logarithmic_interpolation", "rms",
           "transformer_residual_scaling_rule", "vmap_reduction"}
# Short names the docstrings use for the package's modules.
ALIASES = {"U": "unit_scaling.functional", "functional": "unit_scaling.functional",
           "scale": "unit_scaling.scale", "formats": "unit_scaling.formats",
           "optim": "unit_scaling.optim", "parametrization": "unit_scaling.parametrization",
           "analysis": "unit_scaling.analysis", "unit_scaling": "unit_scaling"}
_STATEMENT = re.compile(
    r"(?P<key>Forward and backward|Forward|Backward|Constraint|No constraint)"
    r"(?P<note>[^:.]{0,40}):?\s*(?P<text>.*?)(?=(?:\s(?:Forward|Backward|Constraint|No constraint)\b)|\n\s*\n|$)",
    re.S,
)


def _clean(text: str) -> str:
    """One line, the first sentence, escaped for a markdown table."""
    text = " ".join(text.split())
    text = re.split(r"\.\s+(?=[A-Z])", text)[0].rstrip(".")
    return text.replace("|", "\\|")


def _fraction(x: float) -> str:
    return {0.5: "1/2", 1.0: "1", 0.25: "1/4"}.get(x, f"{x:g}")


def op_rules(fn) -> dict[str, str]:
    """`{"forward": ..., "backward": ..., "constraint": ...}` of one op, from its code."""
    doc = inspect.getdoc(fn) or ""
    rules = {"forward": "", "backward": ""}
    for m in _STATEMENT.finditer(doc):
        key, text = m.group("key"), _clean(m.group("note") + " " + m.group("text"))
        if key == "Forward and backward":
            rules["forward"] = rules["forward"] or _clean(m.group("text"))
            rules["backward"] = rules["backward"] or text
        elif key in ("Forward", "Backward"):
            rules[key.lower()] = rules[key.lower()] or text
    if not rules["forward"]:  # the summary line states the forward computation
        rules["forward"] = _clean(doc.split("\n\n")[0])
    params = inspect.signature(fn).parameters
    powers = params.get("scale_power")
    if powers is not None:  # `fan_in^-p0` -> the default power
        for i, p in enumerate(powers.default):
            for k in rules:
                rules[k] = rules[k].replace(f"^-p{i}", f"^-{_fraction(p)}")
    rules["constraint"] = "-" if "constraint" not in params else repr(params["constraint"].default)
    return rules


def op_table() -> str:
    """The markdown table of every op of `unit_scaling.functional`."""
    import unit_scaling.functional as U

    rows = ["| op | forward | backward | default constraint |", "|---|---|---|---|"]
    for name in U.__all__:
        fn = getattr(U, name)
        if name in NOT_OPS or not inspect.isfunction(fn):
            continue
        r = op_rules(fn)
        constraint = "-" if r["constraint"] == "-" else f"`{r['constraint']}`"
        rows.append(f"| `{name}` | {r['forward']} | {r['backward'] or '-'} | {constraint} |")
    return "\n".join(rows)


_REF = re.compile(r"`((?:%s)\.[A-Za-z_][\w.]*)" % "|".join(map(re.escape, ALIASES)))


def _resolve(ref: str) -> bool:
    head, *rest = ref.rstrip(".").split(".")
    obj, path = importlib.import_module(ALIASES[head]), ALIASES[head]
    for part in rest:
        if hasattr(obj, part):
            obj = getattr(obj, part)
        else:
            try:
                obj = importlib.import_module(f"{path}.{part}")
            except ImportError:
                return False
        path = f"{path}.{part}"
    return True


def broken_references(modules) -> list[str]:
    """`module: reference` for every reference in a docstring that does not resolve."""
    bad = []
    for module in modules:
        objects = [module] + [v for n, v in vars(module).items() if not n.startswith("_")
                              and getattr(v, "__module__", None) == module.__name__]
        for obj in objects:
            members = [obj] + (list(vars(obj).values()) if inspect.isclass(obj) else [])
            for member in members:
                doc = getattr(member, "__doc__", None) if callable(member) or member is obj else None
                for ref in _REF.findall(doc or "") if isinstance(doc, str) else []:
                    if not _resolve(ref):
                        bad.append(f"{module.__name__}: {ref}")
    return sorted(set(bad))


def broken_links(out: Path) -> list[str]:
    bad = []
    for page in out.rglob("*.html"):
        for href in re.findall(r'href="([^"#:]+\.html)', page.read_text()):
            if not (page.parent / href).resolve().exists():
                bad.append(f"{page.relative_to(out)} -> {href}")
    return sorted(set(bad))


def build(out: Path) -> list[str]:
    """Writes the reference to `out`; returns the problems found (empty: all good)."""
    import pdoc
    import pdoc.extract
    import pdoc.render

    import unit_scaling.functional as U

    names = pdoc.extract.walk_specs(MODULES)
    modules = [importlib.import_module(n) for n in names]
    table = op_table()
    U.__doc__ = (U.__doc__ or "") + "\n\n## The ops (generated from the code)\n\n" + table + "\n"
    for module in modules:  # lazily imported names (unit_scaling.analysis) resolve now
        for name in getattr(module, "__all__", ()):
            getattr(module, name)
    pdoc.render.configure(docformat="markdown", show_source=True,
                          footer_text="unit-scaling-jax API reference")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pdoc.pdoc(*MODULES, output_directory=out)
    pdoc_problems = [str(w.message) for w in caught if w.filename.startswith(os.path.dirname(pdoc.__file__))]
    return pdoc_problems + broken_references(modules) + broken_links(out)


def main(argv: list[str]) -> int:
    out = Path(argv[1] if len(argv) > 1 else ROOT / "build" / "docs" / "api")
    problems = build(out)
    for p in problems:
        print("broken reference:", p, file=sys.stderr)
    print(f"API reference: {out / 'index.html'} ({len(list(out.rglob('*.html')))} pages)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
