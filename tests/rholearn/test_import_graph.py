"""rholearn stands alone: no import of rhocalc (or of a quantum-chemistry code)
anywhere in it, and its entry points load without them."""

import ast
import os
import subprocess
import sys

import rholearn

PACKAGE = os.path.dirname(rholearn.__file__)
FORBIDDEN = ("rhocalc", "pyscf")
"""Top-level packages rholearn must not import (its backends provide what it needs)."""


def _imported_modules(tree: ast.AST):
    """``(line, module)`` of every import statement and every ``import_module`` /
    ``__import__`` call with a literal name."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            function = node.func
            name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", "")
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                yield node.lineno, node.args[0].value


def _python_files():
    for directory, _, names in os.walk(PACKAGE):
        yield from (os.path.join(directory, n) for n in sorted(names) if n.endswith(".py"))


def test_no_module_of_rholearn_imports_rhocalc_or_pyscf():
    files = list(_python_files())
    assert len(files) > 10  # the walk found the package
    offending = []
    for path in files:
        with open(path) as f:
            tree = ast.parse(f.read(), filename=path)
        for line, module in _imported_modules(tree):
            if module.split(".")[0] in FORBIDDEN:
                offending.append(f"{os.path.relpath(path, PACKAGE)}:{line} imports {module}")
    assert offending == []


def test_the_walk_sees_lazy_imports():
    source = "def f():\n    import rhocalc.batch\n    return importlib.import_module('pyscf.dft')\n"
    modules = [module for _, module in _imported_modules(ast.parse(source))]
    assert modules == ["rhocalc.batch", "pyscf.dft"]


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )


def test_entry_points_load_without_rhocalc():
    result = _run(
        "import sys, rholearn.workflow, rholearn.cli\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'rhocalc'))"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_entry_points_import_with_rhocalc_and_pyscf_missing():
    """As if neither were installed (featomic probes pyscf for its own optional
    adapter, so with pyscf installed it is loaded by featomic, not by rholearn)."""
    result = _run(
        "import sys\n"
        "sys.modules.update(rhocalc=None, pyscf=None)  # any import of them fails\n"
        "import rholearn.workflow, rholearn.cli\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('rhocalc', 'pyscf')\n"
        "             and sys.modules[m] is not None))"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_featomic_extension_loads_only_where_featomic_computes():
    """Importing the entry points, checking hypers and building a contracted descriptor
    with the torch expansion load no featomic TorchScript extension (an export would
    record it as needed); a stock descriptor does."""
    result = _run(
        "import torch, rholearn.workflow, rholearn.cli, rholearn.export\n"
        "from rholearn.descriptors import DEFAULT_HYPERS, ContractedLambdaSoap, LambdaSoap, check_hypers\n"
        "check_hypers(DEFAULT_HYPERS)\n"
        "ContractedLambdaSoap(DEFAULT_HYPERS, [1, 8], expansion='torch')\n"
        "print(any('featomic' in library for library in torch.ops.loaded_libraries))\n"
        "LambdaSoap(DEFAULT_HYPERS, [1, 8])\n"
        "print(any('featomic' in library for library in torch.ops.loaded_libraries))"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True"]
