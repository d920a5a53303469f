"""Opt-in int8 inference on the CPU (`--quantize int8`).

The value, fc1 and fc2 layers of the latent self-attention stack (65% of the model's
FLOPs) become `Int8Linear`s: weights quantized once, symmetric per output channel;
activations quantized on the fly, symmetric per token; the product is an exact
int8 x int8 -> int32 matrix product (`torch._int_mm`), rescaled to fp32. On AVX2 these
products run about 3x faster than fp32. The rest stays fp32: on the small trained model
(scripts/int8_agreement.py) quantizing every layer changed 24% of the fills, the latent
layers without q/k 2.5%, and this choice 2.0%. The queries and keys (whose products go
through a softmax), the attention outputs and both cross-attentions are the sensitive
ones. On the small model shipped since (its fourth stage) this choice changes 6-9% of the
fills, and `--dtype bfloat16` on a CPU with native bfloat16 is both closer to fp32 and
faster (precision.py; QUALITY.md, "Mixed precision"). Results are close to, not equal to,
fp32: `--strategy oneshot` parity with the reference holds for fp32 only.

Quantizing 200M weights takes a while, so the int8 weights are cached once per checkpoint
file in `cache_dir()` (`$HF_HOME/perceiver/int8/`) and read back memory-mapped on later runs.
The cache is keyed by what the weights are, never by something a copy can fake: a Hub blob's
file name is the sha256 of its content; any other file is keyed by its resolved path, size,
inode and ctime (a replacement, even of the same size with its mtime copied back, changes
the ctime). A cache that cannot be written (read-only, full disk, a file in its way) is no
failure: the weights are quantized in memory and the caller gets a note to show.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch
from torch import nn

from .layout import hf_home, short_error, write_atomically

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


def quantize_int8(model: nn.Module, weights: Path | None) -> str | None:
    """Replace the chosen nn.Linear layers of `model` (in place) by Int8Linears.

    `weights` is the checkpoint file the model was loaded from: its int8 copy is read from the
    cache, or made and written there. None: quantize without a cache. Returns a one-line note
    for the user when the cache could not be written (the model is quantized all the same),
    else None; never raises for a cache problem.
    """
    linears = _linears(model)
    cache = None
    if weights is not None:
        try:
            cache = cache_path(weights)
        except OSError:  # the weights file went away: nothing to key a cache on
            cache = None
    stored = _read(cache, linears) if cache is not None else None
    if stored is not None:
        for name, _ in linears:
            _swap(model, name, Int8Linear(*(stored[f"{name}.{k}"] for k in _BUFFERS)))
        return None
    for name, linear in linears:
        _swap(model, name, Int8Linear.from_linear(linear))
    if cache is None:
        return None
    from safetensors.torch import save_file

    tensors = {f"{n}.{k}": getattr(model.get_submodule(n), k) for n, _ in linears for k in _BUFFERS}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(cache, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
    except Exception as e:  # OSError, or safetensors' own error for a full disk
        return (
            f"the int8 weights could not be cached in {cache.parent} ({short_error(e)}):"
            " they were quantized in memory, and will be again on the next run"
        )
    return None


_BUFFERS = ("weight_t", "scale", "bias")


def _read(cache: Path, linears) -> dict[str, torch.Tensor] | None:
    """The cached int8 tensors when the file is whole and fits these layers, else None."""
    from safetensors.torch import load_file

    try:
        stored = load_file(cache)
    except Exception:  # absent, unreadable or broken: made again
        return None
    for name, linear in linears:
        out, inp = linear.weight.shape
        want = {"weight_t": ((inp, out), torch.int8), "scale": ((out,), torch.float32), "bias": ((out,), torch.float32)}
        for key, (shape, dtype) in want.items():
            t = stored.get(f"{name}.{key}")
            if t is None or tuple(t.shape) != shape or t.dtype != dtype:
                return None
    return stored


_BLOB = re.compile(r"[0-9a-f]{64}")  # a Hub cache blob: its name is the sha256 of its content


def cache_path(weights: Path) -> Path:
    """Where the int8 copy of the weights file `weights` is cached. Raises OSError if it is gone.

    A Hub snapshot file resolves to `blobs/<sha256 of the content>`: the key is that hash.
    Any other file: its resolved path, size, inode and ctime (which no copy or `touch` can set).
    """
    real = Path(weights).resolve()
    st = real.stat()
    if real.parent.name == "blobs" and _BLOB.fullmatch(real.name):
        what = f"sha256:{real.name}"
    else:
        what = f"{real}|{st.st_size}|{st.st_ino}|{st.st_ctime_ns}"
    key = hashlib.sha256(f"{FORMAT}|{what}".encode()).hexdigest()[:24]
    return cache_dir() / f"{key}.safetensors"


def cache_dir() -> Path:
    """`$HF_HOME/perceiver/int8`, beside the Hub cache (HF_HOME defaults to ~/.cache/huggingface)."""
    return hf_home() / "perceiver" / "int8"
