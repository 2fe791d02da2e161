"""The classifier: heads, built-in normalisation, and a frozen backbone that stays frozen."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from leukonet.training.model import CellClassifier


@pytest.mark.parametrize("kind", ["linear", "fastai"])
def test_heads_give_five_logits(kind: str) -> None:
    model = CellClassifier(backbone="test_efficientnet", pretrained=False, head={"kind": kind, "hidden": 16}).eval()
    assert model(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape == (2, 5)


def test_unknown_head_is_refused() -> None:
    with pytest.raises(ValueError, match="model.head.kind"):
        CellClassifier(backbone="test_efficientnet", pretrained=False, head={"kind": "mlp"})


def test_normalisation_uses_the_backbones_mean_and_std() -> None:
    model = CellClassifier(backbone="test_efficientnet", pretrained=False, mean=[0.5] * 3, std=[0.25] * 3).eval()
    x = torch.full((1, 3, 32, 32), 255 * 0.5)  # the mean colour normalises to zero
    seen = {}
    model.backbone.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    model(x)
    assert torch.allclose(seen["x"], torch.zeros_like(seen["x"]))


def test_a_frozen_backbone_stays_in_eval_mode_through_train() -> None:
    model = CellClassifier(backbone="test_efficientnet", pretrained=False)
    model.freeze_backbone()
    model.train()
    assert not any(m.training for m in model.backbone.modules())
    assert model.head.training and not any(p.requires_grad for p in model.backbone.parameters())
    model.unfreeze_backbone()
    model.train()
    assert all(m.training for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d))


def test_compile_switch_keeps_checkpoint_keys_and_outputs() -> None:
    plain = CellClassifier(backbone="test_efficientnet", pretrained=False).eval()
    compiled = CellClassifier(backbone="test_efficientnet", pretrained=False, compile=True).eval()
    assert list(compiled.state_dict()) == list(plain.state_dict())  # checkpoints stay interchangeable
    compiled.load_state_dict(plain.state_dict())
    x = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.allclose(compiled(x), plain(x), atol=1e-4)
    assert compiled.backbone._compiled_call_impl is not None and plain.backbone._compiled_call_impl is None
