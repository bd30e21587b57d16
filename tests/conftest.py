"""Shared fixtures of the unit tests (the models themselves are built in tiny_models.py)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_models import DiffusionBackend, make_backend  # noqa: E402


@pytest.fixture
def backend64() -> DiffusionBackend:
    return make_backend(torch.float64)


@pytest.fixture
def backend32() -> DiffusionBackend:
    return make_backend(torch.float32)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of tiny models: on a shared 2-core machine OpenMP's thread
    barriers made their matmuls many times slower with 2 threads. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
