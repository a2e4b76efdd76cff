"""Shared fixtures of packtune's tests (the helpers they use live in ``helpers.py``).

* ``tiny``: the ``helpers.tiny_config`` helper as a fixture.
* ``host_reads``: a counter of host reads of any tensor.
* ``@pytest.mark.gpu`` tests are skipped on machines without CUDA.
"""

from __future__ import annotations

import collections

import pytest
import torch

import packtune  # noqa: F401  (registers the "packtune_varlen" attention)
from helpers import tiny_config


@pytest.fixture
def tiny():
    """The ``tiny_config`` helper as a fixture."""
    return tiny_config


READS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__", "numpy", "cpu")


@pytest.fixture
def host_reads(monkeypatch):
    """A counter of host reads of any tensor, per kind, while the fixture is active."""
    counts: collections.Counter = collections.Counter()
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
