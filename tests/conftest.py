import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_grad_enabled(False)

from helpers import tiny_target  # noqa: E402


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("hybrid_sd")


@pytest.fixture(scope="session", params=["llama", "qwen3"])
def target(request, session_tmp):
    """A tiny random target of each family, loaded by the product's loader, linears packed."""
    model, eos = tiny_target(session_tmp, request.param)
    return model
