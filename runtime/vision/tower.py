"""Where a model keeps its vision path: the Qwen2-VL / Qwen2.5-VL ViT, or InternVL's vision tower and
projector wrapped as one ``visual(pixels, grid_thw)`` module.

Its own module because the chunking, the vision attention, the fused vision kernels and the parallel
encoder all need to find the tower, and the parallel encoder in turn uses the chunking: kept in
runtime/vision/parallel.py this lookup made an import circle (chunking <-> vision_parallel).
"""
from __future__ import annotations

from typing import Any

import torch


class InternVLVision:
    """InternVL's vision path as a ``visual(pixels, grid_thw)`` module: the model's own
    ``get_image_features`` (InternViT per tile, class token dropped, pixel shuffle, projector), rows
    flattened frame by frame: (frames * tile_tokens, hidden)."""

    def __init__(self, model: Any):
        self.model = getattr(model, "model", model)  # InternVLModel
        self.config = self.model.vision_tower.config

    def parameters(self) -> Any:
        return self.model.vision_tower.parameters()

    def modules(self) -> Any:
        return iter(())  # nothing for vision_fused to patch: InternViT keeps transformers' code

    def __call__(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.model.config
        out = self.model.get_image_features(pixel_values=pixel_values, vision_feature_layer=cfg.vision_feature_layer,
                                            vision_feature_select_strategy=cfg.vision_feature_select_strategy)
        feats = out if isinstance(out, torch.Tensor) else out.pooler_output
        return feats.reshape(-1, feats.shape[-1])


def vision_bounds(model: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The modules the stock model's forward enters and leaves its vision path by (for timing hooks):
    the ViT itself (Qwen), or InternVL's vision tower and multi-modal projector."""
    if getattr(getattr(model, "config", None), "model_type", None) == "internvl":
        inner = getattr(model, "model", model)
        return inner.vision_tower, inner.multi_modal_projector
    visual = vision_module(model)
    return visual, visual


def vision_module(model: Any) -> Any:
    """The ViT of a Qwen2-VL / Qwen2.5-VL model (``model.model.visual`` in transformers 5, ``model.visual``
    in older releases); for InternVL, its vision path wrapped as one module (InternVLVision)."""
    if getattr(getattr(model, "config", None), "model_type", None) == "internvl":
        return InternVLVision(model)
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "visual"):
        return inner.visual
    return model.visual
