"""The shape of the house (issue "one model, one runtime"): no module over
MAX_LINES lines, and every module starts with two lines saying what it is and
what it owns."""
import ast

from tests.unit.test_imports import modules

MAX_LINES = 900


def test_no_module_is_over_the_limit():
    long = {}
    for module, path in modules().items():
        with open(path, encoding="utf-8") as f:
            n = sum(1 for _ in f)
        if n > MAX_LINES:
            long[module] = n
    assert not long, f"modules over {MAX_LINES} lines (split them by what they own): {long}"


def test_every_module_says_what_it_is_and_owns():
    missing = []
    for module, path in modules().items():
        with open(path, encoding="utf-8") as f:
            doc = ast.get_docstring(ast.parse(f.read(), path), clean=False)
        lines = (doc or "").split("\n")
        if len(lines) < 2 or not lines[0].strip() or not lines[1].strip():
            missing.append(module)
    assert not missing, ("modules whose docstring does not start with two lines (what it "
                         f"is, what it owns): {sorted(missing)}")
