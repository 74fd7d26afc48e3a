"""Shared fixtures: tiny real models and PEFT adapters, built once per session, offline.

Nothing here touches the network or the user's caches: the Hub is switched off, and Hugging Face's
and Mergeflow's caches point into a throwaway folder for the whole session (subprocesses inherit
the environment).
"""

from __future__ import annotations

import os
import shutil
import tempfile

_SESSION_TMP = tempfile.mkdtemp(prefix="mergeflow-tests-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HOME"] = os.path.join(_SESSION_TMP, "hf-home")
os.environ["MERGEFLOW_CACHE"] = os.path.join(_SESSION_TMP, "mergeflow-cache")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    # PEFT mistakes lora_bias's 1-D lora_B.bias for an ungathered ZeRO-3 shard when saving.
    config.addinivalue_line("filterwarnings", "ignore:.*LoRA tensor\\(s\\) have invalid shape")


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SESSION_TMP, ignore_errors=True)


def _key(**kwargs) -> str:
    return repr(sorted((k, repr(v)) for k, v in kwargs.items()))


@pytest.fixture(scope="session")
def make_base(tmp_path_factory):
    """``make_base(arch, dtype=torch.float32, max_shard_size=None, tokenizer=True, **config)``:
    a tiny saved base model (hidden 64, 2 layers); built once per distinct set of arguments.
    Treat the folder as read-only (copy it before damaging it)."""
    from builders import build_base

    root = tmp_path_factory.mktemp("bases")
    built: dict[str, Path] = {}

    def make(arch: str = "llama", **kwargs) -> Path:
        kwargs.setdefault("dtype", torch.float32)
        key = _key(arch=arch, **kwargs)
        if key not in built:
            built[key] = build_base(root / f"{arch}-{len(built)}", arch, **kwargs)
        return built[key]

    return make


@pytest.fixture(scope="session")
def make_adapter(tmp_path_factory):
    """``make_adapter(base, seed=0, save_tokenizer_too=False, **LoraConfig kwargs)``: a real PEFT
    adapter with random non-zero weights, built once per distinct set of arguments. Read-only."""
    from builders import build_adapter

    root = tmp_path_factory.mktemp("adapters")
    built: dict[str, Path] = {}

    def make(base: Path, **kwargs) -> Path:
        key = _key(base=str(base), **kwargs)
        if key not in built:
            built[key] = build_adapter(base, root / f"adapter-{len(built)}", **kwargs)
        return built[key]

    return make


@pytest.fixture(scope="session")
def input_ids() -> torch.Tensor:
    """A fixed batch of random token ids (vocab 128, avoiding the special ids 0-3)."""
    gen = torch.Generator().manual_seed(1234)
    return torch.randint(4, 128, (2, 12), generator=gen)


@pytest.fixture(scope="session")
def prefect_server():
    """One throwaway Prefect server for the whole session (``prefect_test_harness``); its URL is
    exported as PREFECT_API_URL so CLI subprocesses use it instead of starting their own."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        os.environ["PREFECT_API_URL"] = PREFECT_API_URL.value()
        try:
            yield PREFECT_API_URL.value()
        finally:
            os.environ.pop("PREFECT_API_URL", None)
