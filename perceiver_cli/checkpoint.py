"""Load a checkpoint in the reference layout into our model.

A checkpoint directory holds `config.json` plus `model.safetensors` (preferred: read
memory-mapped, no copy) or `pytorch_model.bin` (read with `weights_only=True`).
The model is built on the meta device, so no random initialisation is ever computed,
and the weights are assigned in place (`load_state_dict(..., assign=True)`).

Names are translated by one explicit table (`reference_name`); loading asserts that
every checkpoint tensor is used and every shape matches.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import CheckpointError
from .hub import BIN_FILE, CONFIG_FILE, SAFETENSORS_FILE  # the file names (hub.py imports no torch)
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


def weights_file(directory: Path) -> Path | None:
    """The weights file a checkpoint directory loads from: safetensors first, then .bin."""
    return next((directory / f for f in (SAFETENSORS_FILE, BIN_FILE) if (directory / f).is_file()), None)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file; safetensors memory-mapped, .bin with weights_only=True."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a truncated, corrupted or foreign file
        raise CheckpointError(f"cannot read weights file {path}: {_short(e)}") from e


def load_model(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Build our model from a checkpoint directory in the reference layout."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory")
    config_path = directory / CONFIG_FILE
    weights = weights_file(directory)
    if not config_path.is_file() or weights is None:
        raise CheckpointError(
            f"{directory} is not a Perceiver checkpoint: it needs {CONFIG_FILE} and {SAFETENSORS_FILE} or {BIN_FILE}"
        )
    try:
        cfg = PerceiverConfig.from_json(config_path)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{config_path} is not a usable Perceiver config: {_short(e)}") from e
    return build_model(cfg, read_state_dict(weights), device=device, dtype=dtype, source=str(weights))


def build_model(cfg: PerceiverConfig, ref_sd: dict[str, torch.Tensor], device="cpu", dtype=None, source="checkpoint"):
    """Our model with the reference state dict `ref_sd` assigned to it (checked, no copy on CPU)."""
    with torch.device("meta"):
        model = PerceiverMaskedLM(cfg)
    ours = {}
    for name, meta in model.state_dict().items():
        ref = reference_name(name)
        if ref not in ref_sd:
            raise CheckpointError(f"{source} lacks tensor {ref}: not a {_describe(cfg)} Perceiver masked-LM checkpoint")
        tensor = ref_sd[ref]
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


def save_reference(model: PerceiverMaskedLM, directory: str | Path) -> None:
    """Write `config.json` + `model.safetensors` in the reference layout (used by training)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "perceiver", "architectures": ["PerceiverForMaskedLM"], **model.cfg.to_dict()}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    sd = {reference_name(k): v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(sd, directory / SAFETENSORS_FILE, metadata={"format": "pt"})


def _describe(cfg: PerceiverConfig) -> str:
    return f"{cfg.num_self_attends_per_block}-layer"


def _short(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
