"""Where the model looked: Grad-CAM heat maps on the backbone's last feature map.

``heatmap(model, image, class_index)`` gives an (H, W) float32 map in [0, 1] for an RGB uint8 cell
image, through the model's own preprocessing (``eval_transform`` to its image size; the model
normalises inside); ``overlay(image, heat)`` blends it over the image in the jet colour map.
Grad-CAM (Selvaraju et al., 2017; the ``grad-cam`` package) weights each channel of the last feature
map by the mean gradient of the class logit with respect to it. Those gradients are taken with
respect to activations only: no parameter receives a gradient, a frozen backbone works as well as a
trainable one, and the model's ``requires_grad`` flags, ``.grad`` tensors and train/eval modes are
left as they were found. It always runs in fp32 (autocast off) and eval mode, so it is deterministic.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Sequence

import cv2
import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from leukonet.data.transforms import eval_transform

_CHUNK = 16  # images per forward/backward pass
_LAYERS: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def _untouched(model: nn.Module) -> Iterator[None]:
    """Run Grad-CAM on ``model`` and give it back exactly as it was: train/eval mode of every module,
    ``requires_grad`` and ``.grad`` of every parameter, the frozen-backbone flag, a compiled backbone."""
    modes = {m: m.training for m in model.modules()}
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    frozen = getattr(model, "backbone_frozen", None)
    backbone = getattr(model, "backbone", None)
    compiled = getattr(backbone, "_compiled_call_impl", None)
    device_type = next(model.parameters()).device.type
    try:
        model.eval()
        for p in params:  # gradients flow to the activations, none to the weights
            p.requires_grad_(False)
        if frozen is not None:
            model.backbone_frozen = False  # its forward would run the backbone under no_grad
        if compiled is not None:
            backbone._compiled_call_impl = None  # hooks on an eager backbone, no recompilation
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device_type, enabled=False):
            yield
    finally:
        for m, training in modes.items():
            m.training = training
        for p, flag, grad in zip(params, flags, grads):
            p.requires_grad_(flag)
            p.grad = grad
        if frozen is not None:
            model.backbone_frozen = frozen
        if compiled is not None:
            backbone._compiled_call_impl = compiled


def feature_layer(backbone: nn.Module, image_size: int = 64) -> str:
    """Name of the module whose output ``backbone.forward_features`` returns (timm models): ``bn2`` for
    EfficientNet, ``layer4`` for ResNet. Falls back on timm's last ``feature_info`` entry. Call it in
    eval mode (it runs one small forward pass)."""
    seen: list[tuple[str, object]] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out, name=name: seen.append((name, out)))
             for name, m in backbone.named_modules() if name]
    try:
        device = next(backbone.parameters()).device
        with torch.no_grad():
            features = backbone.forward_features(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        for h in hooks:
            h.remove()
    producers = [name for name, out in seen if out is features]  # inner modules first, outermost last
    if producers:
        return producers[-1]
    info = getattr(backbone, "feature_info", None)
    if info:
        return info[-1]["module"] if isinstance(info, list) else info.module_name()[-1]
    raise ValueError(f"cannot find the last feature layer of {type(backbone).__name__}")


def _target_layer(model: nn.Module) -> nn.Module:
    backbone = model.backbone
    if backbone not in _LAYERS:
        _LAYERS[backbone] = feature_layer(backbone, int(model.hparams.image_size))
    return backbone.get_submodule(_LAYERS[backbone])


def heatmaps(model: nn.Module, images: Sequence[np.ndarray], class_indices: Sequence[int | None] | None = None) -> list[np.ndarray]:
    """``heatmap`` for several images in one batch (they may differ in size)."""
    if not len(images):
        return []
    indices = list(class_indices) if class_indices is not None else [None] * len(images)
    if len(indices) != len(images):
        raise ValueError(f"got {len(indices)} class indices for {len(images)} images")
    if len(images) > _CHUNK:  # bounds the memory the backward pass keeps
        return [h for i in range(0, len(images), _CHUNK) for h in heatmaps(model, images[i:i + _CHUNK], indices[i:i + _CHUNK])]
    transform = eval_transform(int(model.hparams.image_size))
    with _untouched(model):
        device = next(model.parameters()).device
        # float 0-255 (what the uint8 path gives), marked so that every activation is part of the graph
        x = torch.stack([transform(image=_rgb(im))["image"] for im in images]).float().to(device).requires_grad_()
        if any(k is None for k in indices):
            with torch.no_grad():
                predicted = model(x).argmax(1).tolist()
            indices = [p if k is None else int(k) for k, p in zip(indices, predicted)]
        cam = GradCAM(model=model, target_layers=[_target_layer(model)])
        try:
            maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(k) for k in indices])
        finally:
            cam.activations_and_grads.release()
    out = []
    for m, im in zip(maps, images):
        h, w = im.shape[:2]
        m = cv2.resize(np.asarray(m, np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
        out.append(np.clip(np.nan_to_num(m), 0.0, 1.0).astype(np.float32))
    return out


def heatmap(model: nn.Module, image: np.ndarray, class_index: int | None = None) -> np.ndarray:
    """Grad-CAM of ``class_index`` (default: the predicted class) for one RGB uint8 (H, W, 3) image:
    (H, W) float32 in [0, 1], 1 where the evidence for the class is strongest."""
    return heatmaps(model, [image], [class_index])[0]


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The heat map in the jet colour map (blue cold, red hot) blended over the image: RGB uint8 (H, W, 3)."""
    image = _rgb(image)
    h, w = image.shape[:2]
    heat = np.clip(np.nan_to_num(np.asarray(heat, np.float32)), 0, 1)
    if heat.shape != (h, w):
        heat = cv2.resize(heat, (w, h), interpolation=cv2.INTER_LINEAR)
    colour = cv2.cvtColor(cv2.applyColorMap(np.uint8(np.round(255 * heat)), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    return np.round(alpha * colour + (1 - alpha) * image).astype(np.uint8)


def explainer(model: nn.Module) -> Callable[[np.ndarray, int], np.ndarray]:
    """``(image, class_index) -> overlay``: what ``leukonet.inference.report.write_report(explain=...)`` takes."""
    return lambda image, class_index: overlay(image, heatmap(model, image, class_index))


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 RGB image, got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
    return image if image.flags.writeable else image.copy()  # torch wants writable arrays
