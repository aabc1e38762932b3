"""Shared test setup: seeded, single-threaded torch, offline hub, and small fixtures."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("BORA_TEST_THREADS", "2")))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: loads the SmolLM2 decoder or runs long; run with -m slow")
    config.addinivalue_line("markers", "browser: drives headless Chromium against the app")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
