"""Shared fixtures: one artifact cache per test run, real models loaded once per session."""
import os
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("QEFF_LAB_CACHE", tempfile.mkdtemp(prefix="qeff_lab-test-cache-"))

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def minilm_path():
    from qeff_lab.loading import resolve

    return resolve(MINILM).path


@pytest.fixture(scope="session")
def smollm2_path():
    from qeff_lab.loading import resolve

    return resolve(SMOLLM2).path
