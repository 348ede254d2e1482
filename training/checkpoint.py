"""Training state on disk without pickle: tensors in safetensors, everything else in JSON.

A checkpoint folder is read back by a resumed run, possibly from shared storage other people
can write to, so nothing in it is unpickled (``torch.load`` runs arbitrary code from a planted
file). ``save_state`` splits a nested state (an optimizer's or LR scheduler's ``state_dict()``,
the step) into a JSON skeleton whose tensors are references into one safetensors file;
``load_state`` rebuilds it. A file that does not parse raises ``CheckpointError`` naming it.

``save_checkpoint`` and ``restore_checkpoint`` walk the same ``states`` mapping (name -> live
object), so what is saved and what is restored cannot drift apart: a ``torch.nn.Module`` is a
diffusers folder (``unet/``), an ``EMAModel`` its shadow weights (``ema_unet/``), anything else
with a ``state_dict`` (optimizer, LR scheduler) an entry of ``state.json`` + ``state.safetensors``.
A new trained part (an adapter, a second model) is one more entry in the mapping.
"""
from __future__ import annotations

import json
import os
from typing import Any

from pipeline.contract.errors import CheckpointError

STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"
_TENSOR, _TUPLE, _INTKEYS = "__tensor__", "__tuple__", "__intkeys__"


def _split(obj: Any, tensors: dict, path: str) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().cpu().contiguous()
        return {_TENSOR: name}
    if isinstance(obj, dict):
        if obj and all(isinstance(k, int) and not isinstance(k, bool) for k in obj):
            return {_INTKEYS: [[k, _split(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
        if not all(isinstance(k, str) for k in obj):
            raise TypeError(f"{path}: mixed or non-string keys cannot be stored as JSON")
        if any(k in (_TENSOR, _TUPLE, _INTKEYS) for k in obj):
            raise TypeError(f"{path}: a key collides with the checkpoint's own markers")
        return {k: _split(v, tensors, f"{path}.{k}") for k, v in obj.items()}
    if isinstance(obj, tuple):
        return {_TUPLE: [_split(v, tensors, f"{path}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_split(v, tensors, f"{path}[{i}]") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{path}: {type(obj).__name__} cannot be stored without pickle")


def _join(obj: Any, tensors: dict, where: str) -> Any:
    if isinstance(obj, dict):
        if _TENSOR in obj:
            if obj[_TENSOR] not in tensors:
                raise CheckpointError(f"{where}: refers to tensor {obj[_TENSOR]!r}, which is not in {STATE_TENSORS}")
            return tensors[obj[_TENSOR]]
        if _TUPLE in obj:
            return tuple(_join(v, tensors, where) for v in obj[_TUPLE])
        if _INTKEYS in obj:
            return {int(k): _join(v, tensors, where) for k, v in obj[_INTKEYS]}
        return {k: _join(v, tensors, where) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, tensors, where) for v in obj]
    return obj


def save_state(folder: str, state: dict) -> None:
    """Write ``state`` as ``state.json`` + ``state.safetensors`` in ``folder``."""
    from safetensors.torch import save_file

    tensors: dict = {}
    skeleton = _split(state, tensors, "state")
    save_file(tensors, os.path.join(folder, STATE_TENSORS))
    with open(os.path.join(folder, STATE_JSON), "w", encoding="utf-8") as fh:
        json.dump(skeleton, fh)


def load_tensors(path: str) -> dict:
    """A safetensors file's tensors; anything else (a pickle, a truncated file) is a CheckpointError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete (delete the checkpoint folder to "
                              f"resume from the one before it)")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a valid checkpoint file (expected safetensors: {exc}); winnow never "
                              f"unpickles checkpoint files") from None


def load_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a valid checkpoint file (expected JSON: {exc})") from None


def load_state(folder: str) -> dict:
    """Inverse of ``save_state``."""
    skeleton = load_json(os.path.join(folder, STATE_JSON))
    tensors = load_tensors(os.path.join(folder, STATE_TENSORS))
    try:
        state = _join(skeleton, tensors, os.path.join(folder, STATE_JSON))
    except (TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{os.path.join(folder, STATE_JSON)}: not a valid checkpoint file ({exc})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{os.path.join(folder, STATE_JSON)}: not a valid checkpoint file (expected a mapping)")
    return state


def _is_ema(obj) -> bool:
    return hasattr(obj, "shadow_params")


def save_checkpoint(folder: str, states: dict, step: int, cursor, meta: dict) -> None:
    """Write every entry of ``states`` (name -> live object), the step, the loader cursor and ``meta``."""
    import torch

    plain = {}
    for name, obj in states.items():
        if obj is None:
            continue
        if _is_ema(obj):
            obj.save_pretrained(os.path.join(folder, name))
        elif isinstance(obj, torch.nn.Module):
            obj.save_pretrained(os.path.join(folder, name), safe_serialization=True)
        else:
            plain[name] = obj.state_dict()
    save_state(folder, {**plain, "step": step})
    with open(os.path.join(folder, "cursor.json"), "w") as fh:
        json.dump(cursor.to_dict(), fh)
    with open(os.path.join(folder, "meta.json"), "w") as fh:
        json.dump({"step": step, **meta}, fh, indent=2)


def _restore_module(folder: str, module) -> None:
    weights = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    try:
        module.load_state_dict(load_tensors(weights))
    except RuntimeError as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{weights}: does not fit this run's model ({str(exc).splitlines()[0]})") from None


def _restore_ema(folder: str, ema, model) -> None:
    config = load_json(os.path.join(folder, "config.json"))
    shadow = load_tensors(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    names = [n for n, _ in model.named_parameters()]
    missing = [n for n in names if n not in shadow]
    if missing or not isinstance(config, dict):
        raise CheckpointError(f"{folder}: not a valid EMA checkpoint (missing {missing[:3]})")
    scalars = ("decay", "min_decay", "optimization_step", "update_after_step", "use_ema_warmup", "inv_gamma", "power")
    ema.load_state_dict({**{k: config[k] for k in scalars if k in config},
                         "shadow_params": [shadow[n].float() for n in names]})


def restore_checkpoint(folder: str, states: dict):
    """Load a checkpoint ``save_checkpoint`` wrote into the live objects of ``states``; returns (step, cursor).

    Only safetensors and JSON are read: a planted pickle is never loaded, and a file that is not
    what winnow writes raises ``CheckpointError`` naming it. An EMA restores against the module
    saved before it in the mapping (the model it shadows)."""
    import torch

    from training.schedule import Cursor

    model = None
    for name, obj in states.items():
        if isinstance(obj, torch.nn.Module) and not _is_ema(obj):
            _restore_module(os.path.join(folder, name), obj)
            model = obj
    state = load_state(folder)
    try:
        for name, obj in states.items():
            if obj is not None and not _is_ema(obj) and not isinstance(obj, torch.nn.Module):
                obj.load_state_dict(state[name])
        step = int(state["step"])
        cursor = Cursor.from_dict(load_json(os.path.join(folder, "cursor.json")))
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{folder}: state.json or cursor.json is not a valid checkpoint file "
                              f"({type(exc).__name__}: {exc})") from None
    for name, obj in states.items():
        if obj is not None and _is_ema(obj) and os.path.isdir(os.path.join(folder, name)):
            _restore_ema(os.path.join(folder, name), obj, model)
    return step, cursor


def carry_optimizer(folder: str, optimizer, params: list) -> int:
    """Start ``optimizer`` from the moments in checkpoint ``folder`` (another run's, same parameters),
    keeping its own hyperparameters; returns how many parameters have state. Only safetensors and
    JSON are read."""
    import torch

    from pipeline.contract import storage

    with storage.local_copy(folder) as local:      # a checkpoint on a store: this node's copy
        saved = load_state(local).get("optimizer")
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict):
        raise CheckpointError(f"{folder}: state.json has no optimizer state")
    state = saved["state"]
    for i, moments in state.items():
        shapes = {k: tuple(v.shape) for k, v in moments.items() if isinstance(v, torch.Tensor) and v.ndim}
        if not isinstance(i, int) or i >= len(params) or any(s != tuple(params[i].shape) for s in shapes.values()):
            raise CheckpointError(f"{folder}: its optimizer state does not fit this model (parameter {i}); carry it "
                                  f"only between stages of one model")
    own = optimizer.state_dict()
    optimizer.load_state_dict({"state": state, "param_groups": own["param_groups"]})
    return len(state)


__all__ = [
    "CheckpointError",
    "carry_optimizer",
    "load_json",
    "load_state",
    "load_tensors",
    "restore_checkpoint",
    "save_checkpoint",
    "save_state",
]
