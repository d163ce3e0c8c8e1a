"""The file names of a checkpoint directory (torch-free: the CLI checks them before it starts
the engine core, which loads the weights; models/loader.py reads them)."""
from __future__ import annotations

from pathlib import Path

from tpaserve.exceptions import CheckpointError

CONFIG_FILE = "config.json"
SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, BIN, BIN_INDEX)      # lookup order


def check_checkpoint_dir(path: str | Path, flag: str = "--model") -> Path:
    """The directory, if it holds a config.json and weights; else a CheckpointError that
    names the missing file."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{flag} {path}: no such directory")
    if not (root / CONFIG_FILE).is_file():
        raise CheckpointError(f"{flag} {path}: no {CONFIG_FILE} in the directory (the model's "
                              f"shape: n_layer, n_head, head_dim, n_embd, ...)")
    if not any((root / f).is_file() for f in WEIGHT_FILES):
        raise CheckpointError(f"{flag} {path}: no weights in the directory: looked for "
                              + ", ".join(WEIGHT_FILES))
    return root
