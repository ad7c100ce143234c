"""Shared fixtures. Tests run offline (HF_HUB_OFFLINE=1); the real-model tests use the embedded
SmolLM2-135M-Instruct, loaded once per session."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_grad_enabled(False)


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M-Instruct (converted once into the headlens cache)."""
    from headlens import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def planted_induction(tmp_path_factory):
    from headlens import load_model

    from planted import induction_model

    folder = induction_model(tmp_path_factory.mktemp("planted_induction"))
    return load_model(str(folder))


def pytest_collection_modifyitems(items):
    """A test that uses the real model (through the ``smollm`` fixture) is marked ``real`` without saying so,
    so ``-m "not real"`` runs exactly the fast tests (tiny models only)."""
    for item in items:
        if "smollm" in item.fixturenames and not item.get_closest_marker("real"):
            item.add_marker(pytest.mark.real)
