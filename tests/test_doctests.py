"""The worked examples in labkit's docstrings are tests too (minbpe style: they must stay true)."""
import doctest
import importlib

import pytest

MODULES = ["labkit.runtime", "labkit.assets", "labkit.models", "labkit.plotting", "labkit.windtunnel",
           "labkit.hooks", "labkit.gpt", "labkit.data", "labkit.train", "labkit.runs"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} docstring example(s) in {name} no longer hold"
