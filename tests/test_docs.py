"""The README's and docs' code, and every docstring example in anm/, must keep running."""

import doctest
import importlib
import os
import pkgutil
import re
from pathlib import Path

import pytest

import anm

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks():
    for path in DOC_FILES:
        for index, block in enumerate(re.findall(r"```python\n(.*?)```", path.read_text(), re.S)):
            yield pytest.param(block, id=f"{path.name}-{index}")


# Recipes for trainers need the `integrations` extra; without it their blocks skip rather than fail —
# except in CI, which installs the extra (make test) and must run every recipe.
OPTIONAL = ("transformers", "lightning", "accelerate", "diffusers")


@pytest.mark.parametrize("block", list(python_blocks()))
def test_doc_code_runs(block):
    for name in OPTIONAL:
        if re.search(rf"^\s*(import|from) {name}\b", block, re.M) and not os.environ.get("CI"):
            pytest.importorskip(name)
    exec(compile(block, "<doc>", "exec"), {})


MODULES = [importlib.import_module(f"anm.{m.name}") for m in pkgutil.iter_modules(anm.__path__)]


@pytest.mark.parametrize("module", [anm, *MODULES], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_every_public_symbol_has_an_example():
    for name in anm.__all__:
        if name.startswith("__"):
            continue
        doc = getattr(anm, name).__doc__ or ""
        assert "Example:" in doc and ">>>" in doc, name


def test_api_reference_lists_every_public_symbol():
    api = (ROOT / "docs" / "api.md").read_text()
    for name in anm.__all__:
        if not name.startswith("__"):
            assert f"anm.{name}" in api, name
