"""Saving and loading MuLTI model folders: config.json + model.safetensors (+ tokenizer files).

    save_multi("out/MuLTI-demo", model, tokenizer)           # weights stored as fp16 by default
    bundle = load_multi("out/MuLTI-demo")                    # MuLTIBundle(model, tokenizer, config), eval mode

Only safetensors is read: nothing in a model folder is unpickled or executed. The file must hold exactly
the model's tensors: missing or unexpected names, wrong shapes and damaged files are errors that name
what is wrong.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import NamedTuple

import torch

from ..checkpoint import describe_keys, iter_safetensors, parse_dtype, safetensors_keys
from ..errors import CheckpointMismatchError, LayoutError
from .config import MuLTIConfig, load_config

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


class MuLTIBundle(NamedTuple):
    model: "torch.nn.Module"
    tokenizer: object  # transformers BertTokenizerFast, or None when the folder has no tokenizer files
    config: MuLTIConfig


def save_multi(folder: str | os.PathLike, model, tokenizer=None, dtype: torch.dtype | str | None = torch.float16) -> Path:
    """Write `config.json`, `model.safetensors` (floating tensors cast to `dtype`; None keeps them) and,
    when given, the tokenizer files. The weights are written to a temporary name first and renamed,
    so an interrupted save never leaves a half-written model.safetensors behind."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = parse_dtype(dtype) if dtype is not None else None
    state = {}
    portable = model.portable_names()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[portable[name]] = tensor.contiguous()
    partial = folder / (WEIGHTS_NAME + ".partial")
    save_file(state, str(partial), metadata={"format": "pt", "model": "MuLTI"})
    os.replace(partial, folder / WEIGHTS_NAME)
    model.config.save(folder / CONFIG_NAME)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return folder


def load_multi(folder: str | os.PathLike, device: torch.device | str = "cpu",
               dtype: torch.dtype | str = torch.float32) -> MuLTIBundle:
    """A saved MuLTI folder -> MuLTIBundle(model in eval mode on `device` in `dtype`, tokenizer or None, config)."""
    from .model import MuLTI

    folder = Path(folder)
    if not (folder / CONFIG_NAME).is_file():
        raise LayoutError(f"'{folder}' has no {CONFIG_NAME}; a MuLTI folder holds {CONFIG_NAME} and {WEIGHTS_NAME}.")
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise LayoutError(f"'{folder}' has no {WEIGHTS_NAME}; a MuLTI folder holds {CONFIG_NAME} and {WEIGHTS_NAME}.")
    config = load_config(folder / CONFIG_NAME)
    header = safetensors_keys(weights)  # checks the file before anything is built

    model = MuLTI(config)
    targets = model.state_dict()
    from_file = {file_name: name for name, file_name in model.portable_names().items()}
    names = {key: from_file.get(key, key) for key in header}  # files from before the Hub layout: native names
    file_shapes = {names[k]: shape for k, (shape, _) in header.items()}
    missing, unexpected = set(targets) - set(file_shapes), set(file_shapes) - set(targets)
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"'{weights}' does not fit the model its {CONFIG_NAME} describes: missing {describe_keys(missing)}; "
            f"unexpected {describe_keys(unexpected)}. The weights and config.json come from different models.")
    wrong = {k: (s, list(targets[k].shape)) for k, s in file_shapes.items() if list(targets[k].shape) != list(s)}
    if wrong:
        key, (got, want) = next(iter(wrong.items()))
        raise CheckpointMismatchError(
            f"'{weights}': {len(wrong)} tensors have the wrong shape, e.g. '{key}' is {got}, the config expects {want}.")
    with torch.no_grad():
        for name, tensor in iter_safetensors(weights):
            targets[names[name]].copy_(tensor)
    model.to(device=device, dtype=parse_dtype(dtype)).eval()
    return MuLTIBundle(model, _load_tokenizer(folder), config)


def _load_tokenizer(folder: Path):
    if not any((folder / name).is_file() for name in ("tokenizer.json", "vocab.txt")):
        return None
    if importlib.util.find_spec(f"{__package__}.tokenizer") is not None:
        from .tokenizer import load_tokenizer

        return load_tokenizer(folder)
    from transformers import BertTokenizerFast

    return BertTokenizerFast.from_pretrained(str(folder))
