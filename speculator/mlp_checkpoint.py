"""IBM's Hugging Face format for MLP speculators (the `ibm-fms/*-accelerator` folders, as vLLM reads them).

config.json holds `MLPSpeculatorConfig` plus Hugging Face's bookkeeping keys; the weights are `emb.{i}.weight`,
`proj.{i}.weight`, `head.{i}.weight`, `ln.{i}.weight`, `ln.{i}.bias` (some checkpoints prefix them with
`speculator.`). A tied speculator is written with each shared tensor once, under its first stage's name (safetensors
stores no aliases); reading accepts the aliases too. A draft vocabulary, if any, is `draft_vocab.json` beside them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from speculator.draft_vocab import DraftVocab
from speculator.drafter_config import read_drafter_config
from speculator.mlp_speculator import MLPSpeculator, MLPSpeculatorConfig

WEIGHTS_FILE = "model.safetensors"
_HF_KEYS = frozenset({"architectures", "torch_dtype", "dtype", "transformers_version"})  # bookkeeping, not architecture


class SpeculatorLoadError(ValueError):
    """A speculator folder that is not IBM's format, or whose weights do not fit its config."""


def read_config(folder: str | Path) -> MLPSpeculatorConfig:
    return read_drafter_config(folder, "mlp_speculator", MLPSpeculatorConfig, SpeculatorLoadError, _HF_KEYS)


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(str(f)))
    if not files:
        bins = sorted(folder.glob("pytorch_model*.bin"))
        if not bins:
            raise SpeculatorLoadError(f"{folder}: no *.safetensors or pytorch_model*.bin weights")
        for f in bins:
            weights.update(torch.load(f, map_location="cpu", weights_only=True))
    return {k.removeprefix("speculator."): v for k, v in weights.items()}


def load_speculator(
    folder: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> MLPSpeculator:
    """The speculator in `folder`, every parameter read from the checkpoint (unknown or missing names and shape
    mismatches are errors), in eval mode on `device`."""
    folder = Path(folder)
    config = read_config(folder)
    try:
        vocab = DraftVocab.load(folder)
    except (OSError, ValueError) as e:
        raise SpeculatorLoadError(f"{folder}: draft vocabulary: {e}") from None
    model = MLPSpeculator(config, vocab)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[int] = set()
    with torch.no_grad():
        for name, w in _read_weights(folder).items():
            if name not in params:
                raise SpeculatorLoadError(f"{folder}: unexpected weight {name}")
            if params[name].shape != w.shape:
                raise SpeculatorLoadError(f"{folder}: {name} is {list(w.shape)}, expected {list(params[name].shape)}")
            params[name].copy_(w)
            loaded.add(id(params[name]))
    missing = [n for n, p in model.named_parameters() if id(p) not in loaded]
    if missing:
        raise SpeculatorLoadError(f"{folder}: checkpoint lacks {len(missing)} weights, e.g. {missing[0]}")
    return model.to(device=device, dtype=dtype).eval()


def save_speculator(model: MLPSpeculator, folder: str | Path) -> None:
    """Write config.json, model.safetensors (each tied tensor once) and the draft vocabulary, if any."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = next(model.parameters()).dtype
    config = model.config.model_dump() | {
        "architectures": ["MLPSpeculatorPreTrainedModel"],
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters()}  # duplicates removed
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    if model.draft_vocab is not None:
        model.draft_vocab.save(folder)
