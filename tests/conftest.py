"""Fixtures: tiny random checkpoints in the reference layout, written by the reference itself.

`transformers` is the test-only reference; the checkpoints it saves are read by our own
loading code, exactly as a downloaded checkpoint would be.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# A small config that differs from the full size in every dimension; shared by most tests.
TINY = dict(
    num_latents=8, d_latents=32, d_model=16, num_blocks=1, num_self_attends_per_block=2,
    num_self_attention_heads=2, num_cross_attention_heads=2, qk_channels=16, v_channels=32,
    max_position_embeddings=64, initializer_range=0.2,
)

# The config.json of deepmind/language-perceiver (DESIGN.md section 1).
FULL_SIZE = dict(
    num_latents=256, d_latents=1280, d_model=768, num_blocks=1, num_self_attends_per_block=26,
    num_self_attention_heads=8, num_cross_attention_heads=8, qk_channels=256, v_channels=1280,
    cross_attention_widening_factor=1, self_attention_widening_factor=1, use_query_residual=True,
    hidden_act="gelu", vocab_size=262, max_position_embeddings=2048,
)


def make_reference(directory: Path, seed: int = 0, safe: bool = True, **config):
    """Save a random `PerceiverForMaskedLM` to `directory`; return the reference model."""
    from transformers import PerceiverConfig, PerceiverForMaskedLM

    torch.manual_seed(seed)
    ref = PerceiverForMaskedLM(PerceiverConfig(**config)).eval()
    if safe:
        ref.save_pretrained(directory)
    else:  # the Hub's pytorch_model.bin: a plain state dict saved by torch.save
        ref.config.save_pretrained(directory)
        torch.save(ref.state_dict(), Path(directory) / "pytorch_model.bin")
    return ref


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random checkpoint directory (config.json + model.safetensors)."""
    directory = tmp_path_factory.mktemp("tiny")
    make_reference(directory, **TINY)
    return directory


@pytest.fixture(scope="session")
def tiny_reference(tiny_checkpoint):
    from transformers import PerceiverForMaskedLM

    return PerceiverForMaskedLM.from_pretrained(tiny_checkpoint).eval()


@pytest.fixture(autouse=True)
def _no_network(monkeypatch, tmp_path):
    """No test may reach the real Hub: point it at a closed port and a fresh cache."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("PERCEIVER_MODEL", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.pop("HUGGINGFACE_HUB_CACHE", None)
