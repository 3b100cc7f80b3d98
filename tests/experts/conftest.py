"""Shared fixtures of the experts tests: one CPU thread, the tiny tokenizer, a tiny routed Llama."""

from __future__ import annotations

import pytest
import torch

from moe import RoutedModel
from tests.tiny import tiny_backbone, tiny_tokenizer


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One CPU thread: on a shared 2-core machine two threads wait on each other (10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def model(tokenizer) -> RoutedModel:
    return RoutedModel(tiny_backbone("llama", vocab=len(tokenizer)))
