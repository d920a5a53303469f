"""Opt-in int8 inference: close to fp32, cached once, and refused where it cannot run."""

from __future__ import annotations

import pytest
import torch

from perceiver_cli.checkpoint import load_model, weights_file
from perceiver_cli.errors import InputError
from perceiver_cli.filler import MaskFiller
from perceiver_cli.quantize import Int8Linear, cache_path, quantize_int8


def test_int8_linear_is_close_to_fp32():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    x = torch.randn(3, 5, 64)
    got = Int8Linear.from_linear(linear)(x)
    want = linear(x)
    assert got.shape == want.shape
    # per-token and per-channel int8: error well under 1% of the output scale
    assert (got - want).abs().max() < 0.01 * want.abs().max()


def test_quantized_model_swaps_the_latent_value_and_mlp_layers_and_agrees_with_fp32(tiny_checkpoint, tmp_path):
    fp32 = load_model(tiny_checkpoint)
    int8 = quantize_int8(load_model(tiny_checkpoint), tmp_path / "q.safetensors")
    swapped = sorted(n for n, m in int8.named_modules() if isinstance(m, Int8Linear))
    layers = len(fp32.layers)
    assert swapped == sorted(f"layers.{i}.{p}" for i in range(layers) for p in ("attn.v", "mlp.fc1", "mlp.fc2"))
    assert isinstance(int8.layers[0].attn.q, torch.nn.Linear)  # queries/keys stay fp32
    assert isinstance(int8.decoder_cross.attn.v, torch.nn.Linear)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(6, 262, (4, 40), generator=g)
    with torch.no_grad():
        a, b = fp32(ids), int8(ids)
    agree = (a[..., 6:].argmax(-1) == b[..., 6:].argmax(-1)).float().mean().item()
    assert agree >= 0.9


def test_int8_cache_is_written_once_and_read_back_identically(tiny_checkpoint, tmp_path):
    cache = tmp_path / "cache" / "q.safetensors"
    first = quantize_int8(load_model(tiny_checkpoint), cache)
    assert cache.is_file()
    assert not list(cache.parent.glob("*.tmp*"))  # written atomically
    mtime = cache.stat().st_mtime_ns
    second = quantize_int8(load_model(tiny_checkpoint), cache)
    assert cache.stat().st_mtime_ns == mtime  # read, not rewritten
    ids = torch.randint(6, 262, (1, 30))
    with torch.no_grad():
        assert torch.equal(first(ids), second(ids))


def test_a_broken_int8_cache_is_rebuilt(tiny_checkpoint, tmp_path):
    cache = tmp_path / "q.safetensors"
    cache.write_bytes(b"not a safetensors file")
    quantize_int8(load_model(tiny_checkpoint), cache)
    assert cache.stat().st_size > 100


def test_from_pretrained_int8_fills_and_uses_the_cache(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    filler = MaskFiller.from_pretrained(str(tiny_checkpoint), device="cpu", quantize="int8")
    result = filler.fill("Hello [MASK:3] world")
    assert len(result.spans[0].data) == 3
    cached = cache_path(weights_file(tiny_checkpoint))
    assert cached.is_file() and str(cached).startswith(str(tmp_path / "home"))


def test_int8_is_refused_off_the_cpu_and_bad_values_are_refused(tiny_checkpoint):
    with pytest.raises(InputError, match="unknown quantization"):
        MaskFiller.from_pretrained(str(tiny_checkpoint), device="cpu", quantize="int4")
    with pytest.raises(InputError, match="threads"):
        MaskFiller.from_pretrained(str(tiny_checkpoint), device="cpu", threads=0)
