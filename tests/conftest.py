"""Test configuration: the default run is fast and CPU-only; warnings start fresh per test.

Tests marked slow or gpu run only when selected, e.g. `pytest -m slow` (STYLE.md, "Tests");
gpu tests are also skipped without a CUDA device. Tests marked distributed (real gloo
process groups on CPU) run by default, as CI runs them; `-m "not distributed"` leaves them
out, and their heavy variants are also marked slow.
"""

from __future__ import annotations

import inspect
import json
import textwrap

import pytest
import torch

import moekit.config

OPT_IN_MARKS = ("slow", "gpu")


def pytest_collection_modifyitems(config, items):
    selected = config.getoption("-m") or ""
    for item in items:
        for mark in OPT_IN_MARKS:
            if mark in item.keywords and mark not in selected:
                item.add_marker(pytest.mark.skip(reason=f"{mark}: run with -m {mark}"))
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture(autouse=True)
def fresh_warnings():
    """config.warn_once dedupes per process; forget what earlier tests saw."""
    moekit.config._warned.clear()
    yield
    moekit.config._warned.clear()


@pytest.fixture(scope="module")
def one_thread():
    """Micro models run faster on one thread, and do not fight other processes for cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """About 60 kB of Python source: enough for a tokenizer and a validation split (the
    training tests' text; a test module may define its own text_file instead)."""
    path = tmp_path_factory.mktemp("text") / "source.txt"
    path.write_text(inspect.getsource(json.decoder) + inspect.getsource(textwrap), encoding="utf-8")
    return path
