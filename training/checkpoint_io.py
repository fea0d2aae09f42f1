"""Pickle-free checkpoint state: nested Python state (optimizer, scheduler, RNG) as JSON + safetensors.

`torch.save`/`torch.load` would pickle; this project never unpickles. A state object is walked
once: tensors go to `<prefix>.safetensors` under generated keys, and the structure (dicts with
their key types, lists, tuples, numbers, strings, None) goes to `<prefix>.json` with each tensor
replaced by a reference to its key.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return {"__float__": repr(obj)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):  # numpy arrays (numpy RNG state)
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    raise TypeError(f"cannot serialise {type(obj).__name__} without pickle")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__float__" in obj:
            return float(obj["__float__"])
        if "__ndarray__" in obj:
            import numpy as np

            return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
    return obj


def save_state(obj: Any, prefix: str | os.PathLike) -> None:
    """Write `obj` to `<prefix>.json` and `<prefix>.safetensors`."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(obj, tensors)
    prefix = Path(prefix)
    save_file(tensors, str(prefix.with_suffix(".safetensors")))
    prefix.with_suffix(".json").write_text(json.dumps(structure))


def load_state(prefix: str | os.PathLike) -> Any:
    """Read what `save_state` wrote; raises FileNotFoundError naming the missing file."""
    prefix = Path(prefix)
    js, st = prefix.with_suffix(".json"), prefix.with_suffix(".safetensors")
    for f in (js, st):
        if not f.exists():
            raise FileNotFoundError(f"checkpoint state file missing: {f}")
    return _decode(json.loads(js.read_text()), load_file(str(st)))


def state_exists(prefix: str | os.PathLike) -> bool:
    prefix = Path(prefix)
    return prefix.with_suffix(".json").exists() and prefix.with_suffix(".safetensors").exists()
