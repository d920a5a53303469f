"""Load a checkpoint in the reference layout into our model; convert a pytorch_model.bin.

A checkpoint directory holds `config.json` plus `model.safetensors` (preferred: read
memory-mapped, no copy) or `pytorch_model.bin` (read with `weights_only=True`: plain tensors
only, no code from the file ever runs); layout.py names the files. Before anything is built,
config.json is validated (every setting's type and bounds, `PerceiverConfig.validate`) and,
for safetensors, checked against the tensors its header lists (names, shapes, dtypes): a
hostile or mismatched checkpoint fails with one line naming the file and the key or tensor.
The model is then built on the meta device, so no random initialisation is ever computed,
and the weights are assigned in place (`load_state_dict(..., assign=True)`).

Names are translated by one explicit table (`reference_name`); loading checks that every
checkpoint tensor is used, every shape matches and every dtype is a float one.

A Hub repo with only a pytorch_model.bin is converted once to safetensors (`BinCopy`,
which hub.py calls with the files it found or fetched); every later load is memory-mapped.
"""

from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .errors import CheckpointError
from .layout import (  # noqa: F401  (weights_file: part of this module's API)
    BIN_FILE,
    CONFIG_FILE,
    LOADABLE_DTYPES,
    SAFETENSORS_FILE,
    not_a_checkpoint,
    safetensors_header,
    safetensors_problem,
    short_error,
    weights_file,
    write_atomically,
)
from .model import PerceiverConfig, PerceiverMaskedLM

FULL_SIZE_PARAMETERS = 201_108_230  # deepmind/language-perceiver

# Inside one reference `PerceiverLayer`: our name -> reference name.
_LAYER_NAMES = {
    "attn.ln_q": "attention.self.layernorm1",
    "attn.ln_kv": "attention.self.layernorm2",
    "attn.q": "attention.self.query",
    "attn.k": "attention.self.key",
    "attn.v": "attention.self.value",
    "attn.o": "attention.output.dense",
    "ln": "layernorm",
    "mlp.fc1": "mlp.dense1",
    "mlp.fc2": "mlp.dense2",
}
# Top-level parameters and layer prefixes: our name -> reference name.
_TOP_NAMES = {
    "embed.weight": "perceiver.input_preprocessor.embeddings.weight",
    "pos_embed.weight": "perceiver.input_preprocessor.position_embeddings.weight",
    "latents": "perceiver.embeddings.latents",
    "queries": "perceiver.decoder.output_position_encodings.position_embeddings",
    "out_bias": "embedding_decoder.bias",
    "encoder_cross": "perceiver.encoder.cross_attention",
    "layers": "perceiver.encoder.self_attends",
    "decoder_cross": "perceiver.decoder.decoding_cross_attention",
}


def reference_name(name: str) -> str:
    """The reference state-dict name of our parameter `name`."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    prefix, rest = name.split(".", 1)
    if prefix == "layers":  # layers.{i}.<layer name>
        index, rest = rest.split(".", 1)
        prefix = f"layers.{index}"
        top = f"{_TOP_NAMES['layers']}.{index}"
    else:
        top = _TOP_NAMES[prefix]
    module, param = rest.rsplit(".", 1)
    return f"{top}.{_LAYER_NAMES[module]}.{param}"


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what a checkpoint's weights may be
_LAYER_INDEX = re.compile(re.escape(_TOP_NAMES["layers"]) + r"\.(\d+)\.")


class UnreadableWeights(CheckpointError):
    """A pytorch_model.bin that is not a plain state dict (`reason` says why)."""

    def __init__(self, path: Path, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"cannot read weights file {path} as plain tensors (torch.load weights_only=True): {reason}")


def read_config(path: Path) -> PerceiverConfig:
    """The validated config of `path`; CheckpointError naming the file and the bad key."""
    try:
        return PerceiverConfig.from_json(path)
    except (ValueError, TypeError) as e:  # JSON errors are ValueErrors
        raise CheckpointError(f"{path} is not a usable Perceiver config: {short_error(e)}") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {short_error(e)}") from None


def read_bin(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a pytorch_model.bin, with `torch.load(weights_only=True)`; memory-mapped
    when the file is in torch's zip format, read whole when it is in the legacy format."""
    try:
        mmap = zipfile.is_zipfile(path)  # torch.save(..., _use_new_zipfile_serialization=False) is not
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except OSError as e:
        raise CheckpointError(f"cannot read weights file {path}: {short_error(e)}") from None
    except Exception as e:
        if "weights only load failed" in str(e).lower():  # torch suggests turning the safe mode off: never
            raise UnreadableWeights(path, "it holds more than tensors, and loading those could run code") from None
        raise UnreadableWeights(path, short_error(e)) from None
    if not isinstance(state, dict) or not state:
        raise UnreadableWeights(path, "it holds no state dict")
    for name, tensor in state.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise UnreadableWeights(path, f"entry {_shown(name)} is not a named tensor")
    return state


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file; safetensors memory-mapped, .bin with weights_only=True."""
    if path.suffix != ".safetensors":
        return read_bin(path)
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as e:  # a truncated, corrupted or foreign file
        raise CheckpointError(f"cannot read weights file {path}: {short_error(e)}") from None


def load_model(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Build our model from a checkpoint directory in the reference layout."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory")
    config_path = directory / CONFIG_FILE
    weights = weights_file(directory)
    if not config_path.is_file() or weights is None:
        raise CheckpointError(not_a_checkpoint(directory))
    cfg = read_config(config_path)
    model = _meta_model(cfg)
    if weights.suffix == ".safetensors":
        _check_header(model, config_path, weights)  # before a single weight is mapped
    return _assign(model, read_state_dict(weights), device, dtype, str(weights))


def _check_header(model: PerceiverMaskedLM, config_path: Path, weights: Path) -> None:
    """The tensors a safetensors header lists against what config.json implies."""
    try:
        header = safetensors_header(weights)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read weights file {weights}: {short_error(e)}") from None
    for name, entry in header.items():
        if entry["dtype"] not in LOADABLE_DTYPES:
            raise CheckpointError(_bad_dtype(str(weights), name, entry["dtype"]))
    layers, wanted = {int(m[1]) for m in map(_LAYER_INDEX.match, header) if m}, len(model.layers)
    if layers and len(layers) != wanted:
        raise CheckpointError(
            f"{config_path} says num_self_attends_per_block {wanted}, but {weights} holds {len(layers)} self-attention layers"
        )
    for name, meta in model.state_dict().items():
        entry = header.get(reference_name(name))
        if entry is not None and tuple(entry["shape"]) != tuple(meta.shape):
            raise CheckpointError(
                f"{weights}: tensor {reference_name(name)} has shape {tuple(entry['shape'])},"
                f" {config_path} implies {tuple(meta.shape)}"
            )


def _meta_model(cfg: PerceiverConfig) -> PerceiverMaskedLM:
    cfg.validate()  # bounds first: never build a model of 10**9 layers, even on the meta device
    with torch.device("meta"):
        return PerceiverMaskedLM(cfg)


def build_model(cfg: PerceiverConfig, ref_sd: dict[str, torch.Tensor], device="cpu", dtype=None, source="checkpoint"):
    """Our model with the reference state dict `ref_sd` assigned to it (checked, no copy on CPU)."""
    try:
        model = _meta_model(cfg)
    except ValueError as e:
        raise CheckpointError(f"the config of {source} is not usable: {short_error(e)}") from None
    return _assign(model, ref_sd, device, dtype, source)


def _assign(model: PerceiverMaskedLM, ref_sd: dict[str, torch.Tensor], device, dtype, source: str):
    cfg = model.cfg
    ours = {}
    for name, meta in model.state_dict().items():
        ref = reference_name(name)
        if ref not in ref_sd:
            raise CheckpointError(f"{source} lacks tensor {ref}: not a {_describe(cfg)} Perceiver masked-LM checkpoint")
        tensor = ref_sd[ref]
        if tensor.dtype not in FLOAT_DTYPES:
            raise CheckpointError(_bad_dtype(source, ref, str(tensor.dtype).removeprefix("torch.")))
        if tuple(tensor.shape) != tuple(meta.shape):
            raise CheckpointError(
                f"{source}: tensor {ref} has shape {tuple(tensor.shape)}, the config needs {tuple(meta.shape)}"
            )
        ours[name] = tensor
    unused = set(ref_sd) - {reference_name(n) for n in ours}
    if unused:
        raise CheckpointError(f"{source} has tensors this model does not use, e.g. {sorted(unused)[0]}")
    if dtype is not None or torch.device(device).type != "cpu":
        ours = {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in ours.items()}
    model.load_state_dict(ours, assign=True, strict=True)
    return model.eval().requires_grad_(False)


def convert_bin(bin_path: Path, config_path: Path, directory: Path, source: str) -> Path:
    """Write `directory/{config.json, model.safetensors}` from a pytorch_model.bin and its config,
    so that later loads are memory-mapped; return the safetensors file. `source` goes into its
    metadata. Raises UnreadableWeights for a .bin that is not plain tensors, CheckpointError
    for one that is not float weights or a copy that cannot be written."""
    from safetensors.torch import save_file

    tensors, storages = {}, set()
    for name, tensor in read_bin(bin_path).items():
        if tensor.dtype not in FLOAT_DTYPES:
            raise CheckpointError(_bad_dtype(str(bin_path), name, str(tensor.dtype).removeprefix("torch.")))
        tensor = tensor.contiguous()
        if tensor.untyped_storage().data_ptr() in storages:  # safetensors stores no shared memory: give the sharer its own
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor
    weights = directory / SAFETENSORS_FILE
    try:  # each file is written whole, then renamed into place: a reader never sees half of one
        directory.mkdir(parents=True, exist_ok=True)
        write_atomically(directory / CONFIG_FILE, lambda tmp: tmp.write_bytes(config_path.read_bytes()))
        write_atomically(weights, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", "source": source}))
    except Exception as e:  # OSError, or safetensors' own error for a full disk
        raise CheckpointError(f"cannot write the safetensors copy of {BIN_FILE} to {directory}: {short_error(e)}") from None
    return weights


@dataclass(frozen=True)
class BinCopy:
    """The safetensors copy of a Hub repo's pytorch_model.bin at one commit, converted once
    (`convert_bin`) into `directory`, so that every later load is memory-mapped. hub.py
    finds and fetches the files and picks the folder (beside the cache's snapshots); this
    says whether a copy will do, converts, and has a .bin that cannot be read fetched once
    more through the function hub.py hands it."""

    repo_id: str
    commit: str
    directory: Path  # config.json + model.safetensors

    @property
    def weights(self) -> Path:
        return self.directory / SAFETENSORS_FILE

    def whole(self) -> bool:
        """A copy is there and whole; False (absent, or cut off): convert again."""
        return (self.directory / CONFIG_FILE).is_file() and self.weights.is_file() and safetensors_problem(self.weights) is None

    def convert(self, config: Path, bin_path: Path) -> Path:
        """Write the copy from `bin_path` and the repo's `config`. Raises UnreadableWeights for
        a .bin that is not plain tensors (hub.py notes a cached one as corrupted)."""
        return convert_bin(bin_path, config, self.directory, source=f"{self.repo_id}@{self.commit}/{BIN_FILE}")

    def convert_download(self, config: Path, bin_path: Path, refetch: Callable[[], Path] | None) -> Path:
        """`convert` a .bin fetched from the Hub. One that cannot be read is fetched again with
        `refetch` when there is one (the .bin came from the cache, where it may have gone bad)
        and converted once more; a .bin downloaded whole (its size checked) that cannot be read
        is bad in itself. Either way a CheckpointError names the repo and the commit."""
        while True:
            try:
                return self.convert(config, bin_path)
            except UnreadableWeights as e:
                if refetch is None:
                    raise CheckpointError(
                        f"{BIN_FILE} of {self.repo_id} at commit {self.commit[:12]} cannot be read as plain tensors"
                        f" (torch.load weights_only=True): {e.reason}"
                    ) from None
            bin_path, refetch = refetch(), None


def save_reference(model: PerceiverMaskedLM, directory: str | Path) -> None:
    """Write `config.json` + `model.safetensors` in the reference layout (used by training)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "perceiver", "architectures": ["PerceiverForMaskedLM"], **model.cfg.to_dict()}
    write_atomically(directory / CONFIG_FILE, lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8"))
    sd = {reference_name(k): v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    write_atomically(directory / SAFETENSORS_FILE, lambda tmp: save_file(sd, tmp, metadata={"format": "pt"}))


_DTYPE_NAMES = {  # safetensors' names of the dtypes a checkpoint may not hold
    "F64": "float64", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}


def _bad_dtype(source: str, name: str, dtype: str) -> str:
    return (
        f"{source}: tensor {name} is {_DTYPE_NAMES.get(dtype, dtype)}, not float32, float16 or bfloat16:"
        " not a Perceiver checkpoint's weights"
    )


def _describe(cfg: PerceiverConfig) -> str:
    return f"{cfg.num_self_attends_per_block}-layer"


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"a {type(value).__name__}"
