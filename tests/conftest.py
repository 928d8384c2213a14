import pytest
import torch

# pytest puts this rootless tests/ directory on the import path, so the shared builders
# import as `helpers` (no test module imports another)
from helpers import tiny_target

torch.set_grad_enabled(False)


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("hybrid_sd")


@pytest.fixture(scope="session", params=["llama", "qwen3"])
def target(request, session_tmp):
    """A tiny random target of each family, loaded by the product's loader, linears packed."""
    model, eos = tiny_target(session_tmp, request.param)
    return model
