"""The shape the code keeps: small functions and classes, no module reaching into another's privates, the load path's
layers importing only downward, and downloading, listing and the tokenizer free of torch."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "gpt2hub"
MODULES = sorted(PACKAGE.glob("*.py"))
# modules above the load path: only these may import hub (export, mirror and the book API load models by name)
ABOVE_HUB = {"hub", "cli", "bench", "export", "book", "__init__", "__main__"}
TORCH_FREE = ("settings", "files", "config", "registry", "errors", "names", "published", "formats", "cache", "checks",
              "arrival", "download", "transports", "fetching", "inventory", "mirror", "streaming", "tf_checkpoint",
              "validate", "tokenizer", "hub")
KNOWN_PRIVATE_IMPORTS = {("bench", "_StaticDecoder")}  # the bench times CUDA graph capture (see gpt2hub/generate.py)


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


@pytest.mark.parametrize("path", MODULES, ids=[p.stem for p in MODULES])
def test_no_function_over_60_lines_and_no_class_over_150(path):
    long = [f"{node.name}: {node.end_lineno - node.lineno + 1} lines" for node in ast.walk(_tree(path))
            if (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60)
            or (isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno >= 150)]
    assert long == []


@pytest.mark.parametrize("path", MODULES, ids=[p.stem for p in MODULES])
def test_no_module_imports_another_modules_private_names(path):
    private = [(path.stem, a.name) for node in ast.walk(_tree(path)) if isinstance(node, ast.ImportFrom) and node.level
               for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert set(private) <= KNOWN_PRIVATE_IMPORTS


@pytest.mark.parametrize("path", [p for p in MODULES if p.stem not in ABOVE_HUB], ids=lambda p: p.stem)
def test_nothing_below_the_hub_imports_it(path):
    imported = {node.module for node in ast.walk(_tree(path)) if isinstance(node, ast.ImportFrom) and node.level}
    assert not imported & {"hub", "cli", "bench", "export", "mirror", "book"}


@pytest.mark.parametrize("module", TORCH_FREE)
def test_downloading_listing_and_tokenizing_import_no_torch(module):
    """`gpt2hub download`, `cache list` and the tokenizer start in well under a second: their modules import no torch
    (the package's __init__ is bypassed here: it is checked by the CLI's own tests)."""
    code = ("import importlib, sys, types\n"
            f"pkg = types.ModuleType('gpt2hub'); pkg.__path__ = [{str(PACKAGE)!r}]; sys.modules['gpt2hub'] = pkg\n"
            f"importlib.import_module('gpt2hub.{module}')\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))[:3])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", (out.stdout, out.stderr[-2000:])
