"""The model-folder format of the small learned networks: ``<name>.safetensors`` (weights) next to
``<name>.json`` (config and info), each written atomically, the weights read back before the rename."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def save_weights(path: str | Path, module: torch.nn.Module) -> None:
    """``module``'s state as safetensors, written atomically and read back before it replaces anything."""
    from safetensors.torch import load_file, save_file

    from ..io.atomic import atomic_file

    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    with atomic_file(Path(path)) as tmp:
        save_file(state, str(tmp))
        if load_file(str(tmp)).keys() != state.keys():
            raise OSError(f"the weights written to {tmp} do not read back")


def save_json(path: str | Path, meta: dict) -> None:
    from ..io.atomic import atomic_file

    with atomic_file(Path(path)) as tmp:
        Path(tmp).write_text(json.dumps(meta, indent=2) + "\n")


def save_folder(folder: str | Path, module: torch.nn.Module, weights_file: str, config_file: str, meta: dict) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(folder / weights_file, module)
    save_json(folder / config_file, meta)
    return folder


def read_folder(folder: str | Path, weights_file: str, config_file: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(the JSON metadata, the weights)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    return json.loads((folder / config_file).read_text()), load_file(str(folder / weights_file))
