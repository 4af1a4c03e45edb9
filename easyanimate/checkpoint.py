"""Reading weight files safely and assigning them into models built on the `meta` device.

Only two readers exist: safetensors, and `torch.load(weights_only=True)` for legacy `.bin`/`.pt`
files. Nothing here unpickles arbitrary objects or executes code from a model folder.

Loading never holds two full copies of a model: modules are built on `meta` (no storage), each
tensor is read, cast to the target dtype/device and assigned in place of its meta placeholder.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from .errors import CheckpointMismatchError, CorruptCheckpointError, LayoutError

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
LEGACY_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

# Wrapper keys that training scripts put around a state dict in legacy files.
_WRAPPER_KEYS = ("state_dict", "module", "model")
# The safetensors format itself refuses headers over 100 MB.
MAX_SAFETENSORS_HEADER = 100_000_000
_SAFETENSORS_ITEMSIZE = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
# Config files (config.json, generation.json, ...) are small; anything bigger is not one.
MAX_CONFIG_BYTES = 16 * 2**20


def read_json_config(path: str | os.PathLike, *, what: str = "config file", max_bytes: int = MAX_CONFIG_BYTES) -> dict:
    """A JSON object from `path`, or LayoutError naming the file and what is wrong with it.

    Only regular files up to `max_bytes` are read (a device such as /dev/zero, a folder or a huge file
    is refused before reading); the content must be UTF-8 JSON holding one object.
    """
    path = Path(path)
    if not path.exists():
        raise LayoutError(f"The {what} '{path}' does not exist.")
    if not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file"
        raise LayoutError(f"The {what} '{path}' is {kind}; expected a JSON file.")
    size = path.stat().st_size
    if size > max_bytes:
        raise LayoutError(
            f"The {what} '{path}' is {size / 2**20:.1f} MiB; a config is a small JSON file (at most "
            f"{max_bytes / 2**20:.0f} MiB). Is this the right file?"
        )
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise LayoutError(f"The {what} '{path}' is larger than {max_bytes / 2**20:.0f} MiB; a config is a small JSON file.")
        value = json.loads(data.decode("utf-8"))
    except OSError as err:
        raise LayoutError(f"Cannot read the {what} '{path}': {err.strerror or err}.") from None
    except UnicodeDecodeError:
        raise LayoutError(f"The {what} '{path}' is not a text file (not UTF-8); expected JSON.") from None
    except json.JSONDecodeError as err:
        raise LayoutError(
            f"The {what} '{path}' is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}. "
            "Fix the file, or restore it from the release."
        ) from None
    if not isinstance(value, dict):
        raise LayoutError(f"The {what} '{path}' holds a JSON {type(value).__name__}, not an object of settings.")
    return value


def check_config_against_weights(config_name: str, checks: Iterable[tuple[str, object, object]], weights: str) -> None:
    """Refuse a config whose sizes contradict the weights, before any model is built from it.

    `checks` are (setting, value the config claims, value read from the weights' shapes); a held value of
    None means the weights do not tell. Raises CheckpointMismatchError naming `config_name` (the config
    file, or how the config was given), each wrong setting, the claimed value and what `weights` hold.
    """
    wrong = [(key, claimed, held) for key, claimed, held in checks if held is not None and claimed != held]
    if wrong:
        details = "; ".join(f"{key} = {_short(claimed)}, but the weights hold {_short(held)}" for key, claimed, held in wrong)
        raise CheckpointMismatchError(
            f"{config_name} does not describe the weights in '{weights}': {details} (read from the tensor shapes). "
            "Use the config.json that came with these weights (or correct those values); nothing was built."
        )


def _short(value) -> str:
    if isinstance(value, (list, tuple)) and len(value) > 8:
        return f"[{', '.join(repr(v) for v in value[:6])}, ... ({len(value)} entries)]"
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + " ..."


def count_indexed(keys: Iterable[str], prefix: str) -> int:
    """How many numbered sub-modules `prefix<N>.` the keys hold (highest N + 1; 0 when none)."""
    found = -1
    n = len(prefix)
    for key in keys:
        if key.startswith(prefix):
            index, dot, _ = key[n:].partition(".")
            if dot and index.isdigit():
                found = max(found, int(index))
    return found + 1


def _damaged(path, err) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"Cannot read weights file '{path}': it is damaged or truncated ({err}). "
        "Re-download or re-export this file; a partial download is the usual cause."
    )


def safetensors_keys(path: str | os.PathLike) -> dict[str, tuple[list[int], str]]:
    """Names, shapes and dtypes of a safetensors file, read from its header only (no tensor data)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("file shorter than a safetensors header")
            n = int.from_bytes(head, "little")
            size = path.stat().st_size
            if n <= 0 or 8 + n > size:
                raise ValueError(f"header length {n} does not fit a file of {size} bytes")
            if n > MAX_SAFETENSORS_HEADER:
                raise ValueError(f"header length {n} is over the format's limit of {MAX_SAFETENSORS_HEADER} bytes")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            raise ValueError(f"tensor data needs {8 + n + end} bytes, file has {size}")
        for key, entry in header.items():
            if key != "__metadata__":
                _check_header_entry(key, entry, size)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
        raise _damaged(path, err) from None
    return {k: (v["shape"], v["dtype"]) for k, v in header.items() if k != "__metadata__"}


def _check_header_entry(key: str, entry: dict, size: int) -> None:
    """A tensor's shape and dtype must fill exactly the bytes its offsets give it: a header that claims
    billions of values in a small file is inconsistent, not a model to describe or build."""
    shape, (begin, stop) = entry["shape"], entry["data_offsets"]
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ValueError(f"tensor '{key}' has an invalid shape {shape}")
    if not (isinstance(begin, int) and isinstance(stop, int) and 0 <= begin <= stop):
        raise ValueError(f"tensor '{key}' has invalid data offsets {[begin, stop]}")
    itemsize = _SAFETENSORS_ITEMSIZE.get(entry["dtype"])
    if itemsize is None:
        return  # a dtype newer than this table (packed sub-byte types): not checked here
    count = 1
    for d in shape:
        count *= d
    if count * itemsize != stop - begin:
        raise ValueError(
            f"the header is inconsistent: tensor '{key}' claims shape {shape} ({count:,} {entry['dtype']} values, "
            f"{count * itemsize:,} bytes) but is given {stop - begin:,} bytes of a {size:,}-byte file"
        )


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The free-form `__metadata__` block of a safetensors file (empty dict when absent)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as err:  # safetensors raises its own error types
        raise _damaged(path, err) from None


def iter_safetensors(path, keys: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one at a time, so callers can cast and place each before reading the next."""
    from safetensors import safe_open

    safetensors_keys(path)  # validates header and size first, with a clear message
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names = list(f.keys()) if keys is None else list(keys)
            for name in names:
                yield name, f.get_tensor(name)
    except CorruptCheckpointError:
        raise
    except Exception as err:
        raise _damaged(path, err) from None


def load_legacy(path) -> dict[str, torch.Tensor]:
    """A `.bin`/`.pt` state dict through `torch.load(weights_only=True)`; unwraps `state_dict`-style wrappers."""
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise LayoutError(f"'{path}' is not a weights file (it does not exist or is not a regular file).")
    # mmap works for the zip format (torch >= 1.6) only; the older format is read into memory, through
    # the same weights-only unpickler.
    zipped = zipfile.is_zipfile(path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipped)
    except Exception as err:
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise CorruptCheckpointError(
                f"'{path}' contains pickled Python objects or code besides tensors, which is refused for safety "
                "(nothing in it was run). Convert it to .safetensors with a tool you trust, or use a plain "
                "tensor state dict."
            ) from None
        raise _damaged(path, err) from None
    return unwrap_state_dict(obj, path)


def unwrap_state_dict(obj, path="checkpoint") -> dict[str, torch.Tensor]:
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            raise LayoutError(f"'{path}' holds no tensors (top-level keys: {sorted(obj)[:8]}).")
        obj = inner
    if not isinstance(obj, dict):
        raise LayoutError(f"'{path}' is not a state dict (found {type(obj).__name__}).")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def weight_files(folder: str | os.PathLike, stem: str = "diffusion_pytorch_model") -> list[Path]:
    """The weight files of a diffusers-style folder: an index's shards, one file, or legacy `.bin`.

    Preference: safetensors index, single safetensors, `.bin` index, single `.bin`. Variants such as
    `model.fp16-00001-of-00002.safetensors` are found through their index file.
    """
    folder = Path(folder)
    for suffix in (".safetensors", ".bin"):
        indexes = sorted(folder.glob(f"*{suffix}.index.json"))
        if indexes:
            index = read_json_config(indexes[0], what="weight index")
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise LayoutError(f"The weight index '{indexes[0]}' has no valid 'weight_map' (tensor name -> shard file).")
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise LayoutError(
                    f"'{indexes[0]}' lists shards that are not in the folder: {missing[:4]}. "
                    "The download is incomplete; fetch the missing files."
                )
            return [folder / s for s in shards]
        preferred = folder / f"{stem}{suffix}"
        if preferred.is_file():
            return [preferred]
        singles = sorted(p for p in folder.glob(f"*{suffix}") if p.is_file())
        if len(singles) == 1:
            return singles
        if singles:
            raise LayoutError(
                f"'{folder}' holds several weight files {[p.name for p in singles][:6]} and no index file; "
                "keep one, or add the `.index.json` the release ships."
            )
    raise LayoutError(f"'{folder}' contains no weight files (*.safetensors or *.bin).")


def file_key_shapes(path: Path) -> dict[str, list[int]]:
    """Key → shape for any supported weight file, reading as little as possible."""
    if path.suffix in SAFETENSORS_SUFFIXES:
        return {k: shape for k, (shape, _) in safetensors_keys(path).items()}
    return {k: list(v.shape) for k, v in load_legacy(path).items()}


def iter_file(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if path.suffix in SAFETENSORS_SUFFIXES:
        yield from iter_safetensors(path)
    elif path.suffix in LEGACY_SUFFIXES:
        yield from load_legacy(path).items()
    else:
        raise LayoutError(f"'{path}': unknown weight file type '{path.suffix}' (use .safetensors, or .bin/.pt).")


def describe_keys(keys: Iterable[str], n: int = 5) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:n])
    more = f" … and {len(keys) - n} more" if len(keys) > n else ""
    return f"{len(keys)} ({shown}{more})"


def assign_tensors(
    model: torch.nn.Module,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    dtype: torch.dtype | None,
    device: torch.device | str = "cpu",
    rename: Callable[[str], str | None] = lambda k: k,
    source: str = "checkpoint",
    keep_dtype: Callable[[str], bool] = lambda k: False,
) -> tuple[set[str], set[str]]:
    """Put each tensor in place of the model's parameter/buffer of the same (renamed) name.

    `rename` maps a file key to a model key, or None to skip it silently (ignored training leftovers).
    Floating tensors are cast to `dtype` (None keeps the file's dtype). Returns (assigned, unexpected)
    key sets; shape mismatches raise at once, naming the key and both shapes.
    """
    slots = dict(model.named_parameters(remove_duplicate=False))
    slots.update(dict(model.named_buffers(remove_duplicate=False)))
    assigned, unexpected = set(), set()
    for file_key, tensor in tensors:
        key = rename(file_key)
        if key is None:
            continue
        if key not in slots:
            unexpected.add(file_key)
            continue
        target = slots[key]
        if tuple(target.shape) != tuple(tensor.shape):
            raise CheckpointMismatchError(
                f"{source}: tensor '{file_key}' has shape {tuple(tensor.shape)}, but the model built from the "
                f"config expects {tuple(target.shape)} for '{key}'. The config does not describe these weights "
                "(wrong config.json or a checkpoint of another model size)."
            )
        if tensor.is_floating_point() and dtype is not None and not keep_dtype(key):
            tensor = tensor.to(dtype)
        tensor = tensor.to(device)
        _set_tensor(model, key, tensor)
        assigned.add(key)
    return assigned, unexpected


def _set_tensor(model: torch.nn.Module, key: str, tensor: torch.Tensor) -> None:
    owner_name, _, leaf = key.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if leaf in owner._parameters:
        owner._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[leaf] = tensor


def meta_tensors(model: torch.nn.Module) -> list[str]:
    """Names of parameters/buffers still on `meta` (i.e. never given a value)."""
    names = [n for n, p in model.named_parameters() if p.is_meta]
    names += [n for n, b in model.named_buffers() if b.is_meta]
    return names


def parse_dtype(dtype) -> torch.dtype:
    """Accept torch dtypes and the names users type in node widgets."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "fp32": torch.float32, "float32": torch.float32,
        "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
        "fp16": torch.float16, "float16": torch.float16,
    }
    try:
        return names[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"Unknown dtype '{dtype}'; use one of fp32, bf16, fp16.") from None
