"""Opt-in int8 inference on the CPU (`--quantize int8`).

The value, fc1 and fc2 layers of the latent self-attention stack (65% of the model's
FLOPs) become `Int8Linear`s: weights quantized once, symmetric per output channel;
activations quantized on the fly, symmetric per token; the product is an exact
int8 x int8 -> int32 matrix product (`torch._int_mm`), rescaled to fp32. On AVX2 these
products run about 3x faster than fp32. The rest stays fp32: on the small trained model
(scripts/int8_agreement.py) quantizing every layer changed 24% of the fills, the latent
layers without q/k 2.5%, and this choice 2.0%. The queries and keys (whose products go
through a softmax), the attention outputs and both cross-attentions are the sensitive
ones. Results are close to, not equal to, fp32: `--strategy oneshot` parity with the
reference holds for fp32 only.

Quantizing 200M weights takes a while, so the int8 weights are cached once per checkpoint
file in `cache_dir()` and read back memory-mapped on later runs.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

FORMAT = "int8-v2"  # bump when the cached layout changes


class Int8Linear(nn.Module):
    def __init__(self, weight_t: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.register_buffer("weight_t", weight_t)  # (in, out) int8, contiguous for _int_mm
        self.register_buffer("scale", scale)  # (out,) fp32: weight = weight_t.T * scale[:, None]
        self.register_buffer("bias", bias)  # (out,) fp32

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        w = linear.weight.detach().float()  # (out, in)
        scale = (w.abs().amax(1) / 127).clamp_min(1e-12)
        w8 = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        bias = linear.bias.detach().float() if linear.bias is not None else torch.zeros(w.shape[0])
        return cls(w8.t().contiguous(), scale, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (T, in)
        x_scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127  # (T, 1) per token
        x8 = torch.round(x / x_scale).to(torch.int8)
        y = torch._int_mm(x8, self.weight_t).float()  # (T, out), exact int32 products
        return y.mul_(x_scale).mul_(self.scale).add_(self.bias).view(*shape[:-1], -1)


QUANTIZED = ("attn.v", "mlp.fc1", "mlp.fc2")  # inside the latent layers, `layers.{i}.`


def _linears(model: nn.Module):
    """The linear layers to quantize (see the module docstring)."""
    return [
        (name, m) for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.startswith("layers.") and name.endswith(QUANTIZED)
    ]


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def quantize_int8(model: nn.Module, cache: Path | None = None) -> nn.Module:
    """Replace the chosen nn.Linear layers of `model` by Int8Linears, reading/writing `cache` if given."""
    from safetensors.torch import load_file, save_file

    linears = _linears(model)
    stored = None
    if cache is not None and cache.is_file():
        try:
            stored = load_file(cache)
        except Exception:  # a broken cache file is rebuilt below
            stored = None
    if stored is not None and all(f"{n}.weight_t" in stored for n, _ in linears):
        for name, _ in linears:
            _swap(model, name, Int8Linear(*(stored[f"{name}.{k}"] for k in ("weight_t", "scale", "bias"))))
        return model
    for name, linear in linears:
        _swap(model, name, Int8Linear.from_linear(linear))
    if cache is not None:
        tensors = {f"{n}.{k}": getattr(model.get_submodule(n), k) for n, _ in linears for k in ("weight_t", "scale", "bias")}
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        save_file(tensors, tmp, metadata={"format": FORMAT})
        os.replace(tmp, cache)  # atomic: a killed run never leaves a half-written cache
    return model


def cache_path(weights_file: Path) -> Path:
    """Where the int8 copy of `weights_file` is cached (keyed by its path, size and mtime)."""
    st = weights_file.stat()
    key = hashlib.sha256(f"{FORMAT}|{weights_file.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:24]
    return cache_dir() / f"{key}.safetensors"


def cache_dir() -> Path:
    """`$HF_HOME/perceiver/int8`, beside the Hub cache (HF_HOME defaults to ~/.cache/huggingface)."""
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "huggingface"
    return Path(home) / "perceiver" / "int8"
