"""Loading pretrained weights from a local file, and refusing to hang on hub weights offline.

Training clusters are often offline and checkpoints come in several shapes (a bare state dict, a Lightning
checkpoint whose keys carry the task's attribute prefix, a DDP state dict with ``module.``). One loader accepts them
all, reports what did not fit, and refuses weights that plainly belong to another architecture instead of silently
loading nothing.
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import warnings
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

__all__ = ["load_weights", "hub_weights"]

log = logging.getLogger("gnlightning")

_PREFIXES = ("", "model.", "module.", "net.", "model.model.", "backbone.")


def _read(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        log.warning("%s holds more than tensors (e.g. a Lightning checkpoint with custom hyper-parameters); loading "
                    "it with weights_only=False: only do this with files you trust", path)
        return torch.load(path, map_location="cpu", weights_only=False)


def load_weights(model: nn.Module, source: str | os.PathLike | dict, *,
                 min_match: float = 0.5) -> tuple[list[str], list[str]]:
    """Load a state dict or Lightning checkpoint (a file path, or already in memory) into ``model``; returns
    (missing, unexpected) keys.

    A key prefix (``model.``, ``module.`` ...) is stripped when that makes more keys match. Tensors whose shape
    differs (typically a classifier with another number of classes) are skipped and reported. If fewer than
    ``min_match`` of the model's tensors can be loaded, a ValueError says so: those are weights for another
    architecture."""
    if isinstance(source, dict):
        loaded, path = source, "the given state dict"
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"weights file {str(path)!r} does not exist; pass the path of a state dict (.pth) "
                                    "or a Lightning checkpoint (.ckpt) on this machine")
        loaded = _read(path)
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is neither a state dict nor a Lightning checkpoint (found {type(loaded).__name__})")
    own = model.state_dict()
    prefix = max(_PREFIXES, key=lambda p: sum(k[len(p):] in own for k in state if k.startswith(p)))
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    usable = {k: v for k, v in state.items() if k in own and k not in mismatched}
    if len(usable) < min_match * len(own):
        examples = ", ".join(list(own)[:3])
        raise ValueError(
            f"weights in {path} do not fit {type(model).__name__}: only {len(usable)} of its {len(own)} tensors found "
            f"with matching shapes (e.g. it expects {examples}; the file has {', '.join(list(state)[:3])}). "
            "These look like weights for another architecture; check the model name and the file."
        )
    if mismatched:
        shapes = "; ".join(f"{key} (file {list(state[key].shape)}, model {list(own[key].shape)})"
                           for key in mismatched[:4])
        more = f"; and {len(mismatched) - 4} more" if len(mismatched) > 4 else ""
        warnings.warn(
            f"{len(mismatched)} tensor(s) in {path} do not fit {type(model).__name__} and were not loaded: "
            f"{shapes}{more}. They keep their fresh initialisation, as they must when fine-tuning on data with "
            "another number of classes (the head is learned anew). If the file was trained on this very data, the "
            "class counts differ: build the model with the file's number of classes (gnl-train takes it from the "
            "data: data.num_classes, or the categories of the annotation file)",
            stacklevel=2,
        )
    result = model.load_state_dict(usable, strict=False)
    unexpected = sorted(set(state) - set(own)) + sorted(mismatched)
    if result.missing_keys or unexpected:
        log.info("loaded %d tensors from %s; missing %d (%s), unexpected or mismatched %d (%s)", len(usable), path,
                 len(result.missing_keys), ", ".join(result.missing_keys[:5]), len(unexpected),
                 ", ".join(unexpected[:5]))
    else:
        log.info("loaded all %d tensors from %s", len(usable), path)
    return list(result.missing_keys), unexpected


def hub_weights(model_name: str, weights: str):
    """torchvision's weights enum for ``weights`` (e.g. ``"DEFAULT"``) after checking it can be had.

    Weights already in the torch hub cache are fine. Otherwise the download server must answer within seconds; if it
    does not, a RuntimeError explains how to load the file from a local path instead of letting the download hang.
    """
    local = "pass the path of a local state dict / Lightning checkpoint instead (weights=/path/to/file.pth)"
    try:
        if "." in weights:  # a full name such as "ResNet50_Weights.IMAGENET1K_V2"
            entry = torchvision.models.get_weight(weights)
        else:
            entry = torchvision.models.get_model_weights(model_name)[weights]
    except (KeyError, ValueError, AttributeError):
        if model_name not in torchvision.models.list_models():
            raise ValueError(f"weights={weights!r}: {model_name} is not a torchvision model and has no torchvision "
                             f"weights names; {local}") from None
        names = ", ".join(["DEFAULT", *(entry.name for entry in torchvision.models.get_model_weights(model_name))])
        raise ValueError(f"weights={weights!r} is neither a file nor a torchvision weights name for {model_name} "
                         f"(those are {names}), or {local}") from None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(entry.url).path)
    if cached.is_file():
        return entry
    host = urlparse(entry.url).hostname
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as error:
        raise RuntimeError(
            f"weights {weights!r} for {model_name} are not in the torch hub cache ({cached}) and their server cannot "
            f"be reached ({error}). Download {entry.url} on a machine with network access and pass its local path "
            "instead (weights=/path/to/file.pth)."
        ) from None
    return entry
