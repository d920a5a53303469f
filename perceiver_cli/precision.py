"""Mixed precision on the CPU (`--dtype bfloat16` on a CPU): bfloat16 products, float32 the rest.

The big matrix products run in bfloat16 (8 bits of mantissa; oneDNN multiplies and
accumulates in float32: AVX512-BF16 about 2x the float32 rate, AMX 4.8x on our machine);
everything that is sensitive stays float32: LayerNorm, the softmax, GELU, the residual
stream, the attention products, the logits and their log-softmax. Each `BF16Linear` keeps
its weight once, in bfloat16 (half the memory of float32), and returns float32: its input
is rounded to bfloat16, the product (rounded to bfloat16 by oneDNN, which has no float32
output for bfloat16 inputs on the CPU) is widened and the float32 bias added. The float32
checkpoint stays the source: the weights are converted when the model is loaded (no
other file).

Which products, decided group by group on the small trained model's 400 test cases and on
full-size weights (`scripts/precision_study.py`; QUALITY.md, "Mixed precision"): the value,
output and MLP products of the latent layers (`DEFAULT_GROUPS`, 83% of the model's FLOPs).
Their fills equal float32's on 98.5% (oneshot), 98.0% (the default strategy) and 99.2%
(`[MASK]`). The latent queries and keys (whose products go through a softmax) would add
speed for 1 point of agreement; the encoder cross-attention and the decoder alone each
change 2-3% of the fills. int8 lost to bfloat16 in every group (more fills changed, no
faster). Results are close to, not equal to, float32's: `--strategy oneshot` parity with
the reference holds for float32 only.

bfloat16 products are fast only on CPUs that compute them natively (x86 AVX512-BF16 or
AMX-BF16, Arm's BF16 extension: Apple M2 and later, Graviton 3 and later); elsewhere oneDNN
emulates them, several times SLOWER than float32. `native_bf16()` tells them apart.
"""

from __future__ import annotations

import platform
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

BF16 = torch.bfloat16


class BF16Linear(nn.Module):
    """`nn.Linear` with its weight stored in bfloat16; float32 in, float32 out."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().to(BF16), requires_grad=False)  # (out, in)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)  # (out,)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> BF16Linear:
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.to(BF16), self.weight).float()  # products in bf16, accumulated in fp32
        return y if self.bias is None else y.add_(self.bias)


# The linear layers of each group, by their name in `PerceiverMaskedLM` (`layers.{i}.attn.q`).
GROUPS: dict[str, Callable[[str], bool]] = {
    "latent q/k": lambda n: n.startswith("layers.") and n.endswith(("attn.q", "attn.k")),
    "latent v": lambda n: n.startswith("layers.") and n.endswith("attn.v"),
    "latent o": lambda n: n.startswith("layers.") and n.endswith("attn.o"),
    "latent MLP": lambda n: n.startswith("layers.") and n.endswith(("mlp.fc1", "mlp.fc2")),
    "encoder cross-attention": lambda n: n.startswith("encoder_cross."),
    "decoder": lambda n: n.startswith("decoder_cross."),
}
DEFAULT_GROUPS = ("latent v", "latent o", "latent MLP")


def to_mixed(model: nn.Module, groups: tuple[str, ...] = DEFAULT_GROUPS, weights: Path | None = None) -> nn.Module:
    """Replace the linear layers of `groups` in `model` (float32, in place) by BF16Linears.

    `weights`: the safetensors file `model` was loaded from (memory-mapped). The weights to
    convert are then read from it with plain reads, which leave the mapping's pages
    untouched: the process never holds their float32 copy (a cold fill's peak memory falls
    from 1.4x float32's to below it). None, or a file that does not match: converted from
    the tensors in memory.
    """
    unknown = set(groups) - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown precision groups: {', '.join(sorted(unknown))}")
    chosen = [
        (name, m) for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and any(GROUPS[g](name) for g in groups)
    ]
    stored = _FileWeights(weights) if weights is not None else None
    for name, linear in chosen:
        weight = stored.read(f"{name}.weight", linear.weight) if stored is not None else None
        new = BF16Linear(linear.weight if weight is None else weight, linear.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    # The float32 tensors left are copied out of the memory-mapped checkpoint file (17% of
    # the weights), so that nothing holds its mapping: the process keeps the bfloat16 copies
    # and that 17%, not the file's pages it read to convert.
    for module in model.modules():
        for key, tensor in module.named_parameters(recurse=False):
            if tensor.dtype != BF16:
                module.register_parameter(key, nn.Parameter(tensor.detach().clone(), requires_grad=False))
    return model


_FILE_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}  # safetensors' names


class _FileWeights:
    """Tensors of a safetensors file read with plain file reads (not through a mapping)."""

    def __init__(self, path: Path):
        from .layout import safetensors_header

        self.path = Path(path)
        try:
            self.header = safetensors_header(self.path)
            with open(self.path, "rb") as f:
                self.start = 8 + int.from_bytes(f.read(8), "little")  # the data follow the header
        except (OSError, ValueError):
            self.header = {}

    def read(self, name: str, like: torch.Tensor) -> torch.Tensor | None:
        """Our parameter `name` as the file holds it, or None when the file's entry does not
        match `like` (the tensor loaded) in shape, or cannot be read."""
        from .checkpoint import reference_name

        entry = self.header.get(reference_name(name))
        if entry is None or entry["dtype"] not in _FILE_DTYPES or tuple(entry["shape"]) != tuple(like.shape):
            return None
        start, end = entry["data_offsets"]
        data = bytearray(end - start)
        try:
            with open(self.path, "rb") as f:
                f.seek(self.start + start)
                if f.readinto(data) != len(data):
                    return None
        except OSError:
            return None
        return torch.frombuffer(data, dtype=_FILE_DTYPES[entry["dtype"]]).view(like.shape)


# -- does this CPU compute bfloat16 natively? ------------------------------------------------

_X86_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo `flags`
_ARM_FLAGS = ("bf16",)  # /proc/cpuinfo `Features` (Linux on Arm)


def native_bf16(cpuinfo: str | None = None, machine: str | None = None) -> bool | None:
    """True when this CPU has native bfloat16 products, False when it has not, None when
    it cannot tell. `cpuinfo` (the text of /proc/cpuinfo) and `machine` (platform.machine())
    may be given to ask about another CPU (tests simulate one without bf16 so)."""
    machine = (machine or platform.machine()).lower()
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return _macos_bf16() if platform.system() == "Darwin" else None
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    if not flags:
        return None
    wanted = _ARM_FLAGS if machine in ("aarch64", "arm64") else _X86_FLAGS
    return any(f in flags for f in wanted)


def _macos_bf16() -> bool | None:
    """Apple silicon: `sysctl hw.optional.arm.FEAT_BF16` (1 on M2 and later)."""
    try:
        out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    value = out.stdout.strip()
    return value == "1" if value in ("0", "1") else None


EMULATED_NOTE = (
    "this CPU has no native bfloat16 products (AVX512-BF16, AMX-BF16 or Arm BF16): bfloat16 runs"
    " slower than float32 here, and float32 is exact: leave the dtype at auto"
)
