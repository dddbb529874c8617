"""Fixtures of the evaluation tests: a locally trained tokenizer, tiny checkpoints, local Ray."""

from __future__ import annotations

import pytest

from ray_jobs.eval.model import build_token_counter
from tests.support import eval_fixtures as fixtures


@pytest.fixture(scope="session")
def tokenizer():
    return fixtures.build_tokenizer()


@pytest.fixture(scope="session")
def count_tokens(tokenizer):
    return build_token_counter(tokenizer)


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    return fixtures.build_tiny_model(len(tokenizer), 512)


@pytest.fixture(scope="session")
def ray_cluster(local_ray):
    """The session's local Ray cluster (tests/conftest.py), as the `ray` module."""
    import ray

    return ray


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module: a tiny model decodes ~30x faster on one thread than on
    two contended ones (128 tokens at 4K: 0.13 s against 4.4 s measured on this 2-core machine
    under load)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
