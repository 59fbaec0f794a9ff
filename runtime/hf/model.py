"""Load a Qwen2-VL / Qwen2.5-VL / InternVL3 model: a checkpoint, or real-size random weights for benchmarks.

Only transformers' own model classes are used (no copied modeling files). Loading problems are
InputErrors naming ``model.checkpoint``; a model that does not match the plan is a
PlanMismatchError naming ``model``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from spava_plan.errors import InputError, PlanMismatchError
from spava_plan.plan import ModelSpec, Plan

from .. import rope
from ..dtypes import TORCH_DTYPES

# Plan family -> transformers class, and the model_type its config.json declares.
FAMILIES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
            "internvl3": "InternVLForConditionalGeneration"}
MODEL_TYPES = {"qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_5_vl", "internvl3": "internvl"}
# InternVL3's <img>, </img>, <IMG_CONTEXT> ids (vocabulary of 151674); tiny vocabularies use their last ids.
INTERNVL_SPECIAL_IDS = {"start_image_token_id": 151665, "end_image_token_id": 151666, "image_token_id": 151667}
# Qwen's vision special token ids (vocabularies of ~152K); tiny vocabularies use their last ids.
QWEN_SPECIAL_IDS = {"vision_start_token_id": 151652, "vision_end_token_id": 151653, "image_token_id": 151655,
                    "video_token_id": 151656}
DTYPES = TORCH_DTYPES  # dtype name -> torch dtype (runtime/dtypes.py)


def _model_class(family: str) -> Any:
    import transformers

    return getattr(transformers, FAMILIES[family])


def _first_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[0].strip() if lines else type(exc).__name__


def family_of(model_type: str | None) -> str | None:
    """The plan family of a transformers model_type (None when unsupported)."""
    return {t: f for f, t in MODEL_TYPES.items()}.get(model_type or "")


def checkpoint_family(checkpoint: str) -> str:
    """The plan family of the model a checkpoint's config.json declares (InputError when
    unreadable/unsupported)."""
    path = Path(checkpoint)
    if not path.is_dir():
        raise InputError(f"no checkpoint directory at {checkpoint!r}", setting="model.checkpoint")
    cfg = path / "config.json"
    try:
        model_type = json.loads(cfg.read_text()).get("model_type")
    except FileNotFoundError:
        raise InputError(f"{checkpoint!r} has no config.json: not a Hugging Face checkpoint",
                         setting="model.checkpoint") from None
    except (OSError, ValueError, AttributeError) as exc:
        raise InputError(f"cannot read {str(cfg)!r}: {_first_line(exc)}", setting="model.checkpoint") from None
    family = family_of(model_type)
    if family is None:
        raise InputError(f"{checkpoint!r} is a {model_type!r} model; spava-plan runs "
                         f"{', '.join(MODEL_TYPES.values())} checkpoints", setting="model.checkpoint")
    return family


def load_checkpoint(checkpoint: str, *, dtype: torch.dtype, device: torch.device | str) -> Any:
    """from_pretrained with the stock sdpa attention (install() switches the language model later).
    Missing, corrupt or incomplete weights are refused instead of silently re-initialised."""
    family = checkpoint_family(checkpoint)
    cls = _model_class(family)
    try:
        model, info = cls.from_pretrained(checkpoint, dtype=dtype, attn_implementation="sdpa",
                                          output_loading_info=True)
    except Exception as exc:  # safetensors / json / shape errors all mean a broken checkpoint
        raise InputError(f"cannot load the weights of {checkpoint!r}: {_first_line(exc)}",
                         setting="model.checkpoint") from None
    missing = list(info.get("missing_keys") or [])
    mismatched = list(info.get("mismatched_keys") or [])
    if missing or mismatched:
        bad = (missing + [str(m[0]) if isinstance(m, (tuple, list)) else str(m) for m in mismatched])
        raise InputError(f"{checkpoint!r} is incomplete: {len(bad)} weights missing or of the wrong shape "
                         f"(e.g. {bad[0]})", setting="model.checkpoint")
    return model.to(device).eval()


def hf_config_from_plan(spec: ModelSpec) -> Any:
    """A transformers config with the plan's model (``plan.model``), for model.init=random."""
    import transformers

    m, vis = spec, spec.vision
    family = m.family
    if family not in FAMILIES:
        raise InputError(f"model.init=random supports {', '.join(FAMILIES)}, not {family!r}", setting="model.family")
    if m.hidden_size != m.num_heads * m.head_dim:
        raise InputError(f"transformers' Qwen attention needs hidden_size = num_heads x head_dim, got "
                         f"{m.hidden_size} != {m.num_heads} x {m.head_dim}", setting="model.head_dim")
    if family == "internvl3":
        return _internvl_config(m)
    vocab = int(m.vocab_size)
    ids = dict(QWEN_SPECIAL_IDS) if vocab > max(QWEN_SPECIAL_IDS.values()) else {
        k: vocab - 4 + i for i, k in enumerate(sorted(QWEN_SPECIAL_IDS))}
    text = dict(vocab_size=vocab, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
                num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
                num_key_value_heads=m.num_kv_heads, max_position_embeddings=m.rope_scaling.original_max_positions,
                rope_parameters=rope.rope_parameters(m.rope_scaling, m.rope_theta, m.mrope_section))
    if vocab <= 151645:  # Qwen's <|endoftext|> / <|im_end|> ids do not exist in a tiny vocabulary
        text.update(bos_token_id=None, eos_token_id=None)
    common = dict(patch_size=vis.patch_size, spatial_merge_size=vis.spatial_merge,
                  temporal_patch_size=vis.temporal_patch, num_heads=vis.num_heads, depth=vis.depth)
    if family == "qwen2_5_vl":
        depth = int(vis.depth)
        full = [i for i in range(7, depth, 8)] or [depth - 1]  # the 3B/7B pattern: every 8th block
        vision = dict(common, hidden_size=vis.hidden_size, intermediate_size=vis.intermediate_size,
                      out_hidden_size=vis.out_hidden_size, tokens_per_second=m.tokens_per_second,
                      fullatt_block_indexes=full)
        cls = transformers.Qwen2_5_VLConfig
    else:
        ratio, rem = divmod(int(vis.intermediate_size), int(vis.hidden_size))
        if rem:
            raise InputError("Qwen2-VL's ViT needs intermediate_size to be a multiple of hidden_size",
                             setting="model.vision.intermediate_size")
        vision = dict(common, embed_dim=vis.hidden_size, mlp_ratio=ratio, hidden_size=vis.out_hidden_size)
        cls = transformers.Qwen2VLConfig
    return cls(text_config=text, vision_config=vision, tie_word_embeddings=bool(m.tie_word_embeddings), **ids)


def internvl_special_ids(vocab: int) -> dict[str, int]:
    """<img>, </img>, <IMG_CONTEXT> ids: InternVL3's, or the last ids of a tiny vocabulary."""
    if vocab > max(INTERNVL_SPECIAL_IDS.values()):
        return dict(INTERNVL_SPECIAL_IDS)
    return {k: vocab - 3 + i for i, k in enumerate(INTERNVL_SPECIAL_IDS)}


def _internvl_config(m: ModelSpec) -> Any:
    """transformers' InternVLConfig: InternViT (LayerNorm, qkv bias, layer scale, as InternViT-300M
    of InternVL3) + pixel shuffle 0.5 + projector, and a Qwen2 language model with 1-D RoPE."""
    import transformers

    vis = m.vision
    side, rem = divmod(int(vis.tile_size), int(vis.patch_size))
    if rem or side % 2 or (side // 2) ** 2 != int(vis.tile_tokens):
        raise InputError(f"InternVL's pixel shuffle turns a {vis.tile_size}-pixel tile of {vis.patch_size}-pixel "
                         f"patches into ((tile/patch)/2)^2 tokens, not {vis.tile_tokens}",
                         setting="model.vision.tile_tokens")
    if int(vis.spatial_merge) != 2:
        raise InputError("InternVL's pixel shuffle merges 2x2 patches", setting="model.vision.spatial_merge")
    vocab = int(m.vocab_size)
    text = dict(model_type="qwen2", vocab_size=vocab, hidden_size=m.hidden_size,
                intermediate_size=m.intermediate_size, num_hidden_layers=m.num_layers,
                num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
                max_position_embeddings=m.rope_scaling.original_max_positions,
                tie_word_embeddings=bool(m.tie_word_embeddings),
                rope_parameters=rope.rope_parameters(m.rope_scaling, m.rope_theta, None))
    if vocab <= 151645:  # Qwen's <|endoftext|> / <|im_end|> ids do not exist in a tiny vocabulary
        text.update(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    vision = dict(hidden_size=vis.hidden_size, num_hidden_layers=vis.depth, num_attention_heads=vis.num_heads,
                  intermediate_size=vis.intermediate_size, image_size=[vis.tile_size] * 2,
                  patch_size=[vis.patch_size] * 2, attention_bias=True, use_qk_norm=False, norm_type="layer_norm",
                  hidden_act="gelu", use_mean_pooling=False)
    return transformers.InternVLConfig(
        text_config=text, vision_config=vision, image_token_id=internvl_special_ids(vocab)["image_token_id"],
        image_seq_length=int(vis.tile_tokens), downsample_ratio=0.5, projector_hidden_act="gelu",
        vision_feature_layer=-1, vision_feature_select_strategy="default",
        tie_word_embeddings=bool(m.tie_word_embeddings))


def random_model(spec: ModelSpec, *, dtype: torch.dtype, device: torch.device | str, seed: int = 0) -> Any:
    """A real-size model with random weights (the plan's ``plan.model``), built directly on
    ``device`` (fast on a GPU)."""
    config = hf_config_from_plan(spec)
    cls = _model_class(spec.family)
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def check_model(plan: Plan, model: Any) -> None:
    """The plan was made for this model's family and dims (PlanMismatchError otherwise)."""
    family = family_of(getattr(model.config, "model_type", None))
    if family != plan.model.family:
        raise PlanMismatchError(f"the plan was made for a {plan.model.family} model ({plan.model.name!r}) but the "
                                f"checkpoint is {family}; re-plan with the matching model= or add replan=true",
                                setting="model")
    tc = getattr(model.config, "text_config", model.config)
    heads = int(tc.num_attention_heads)
    try:
        plan.check_model(num_layers=int(tc.num_hidden_layers), num_heads=heads,
                         num_kv_heads=int(tc.num_key_value_heads), head_dim=int(tc.hidden_size) // heads,
                         hidden_size=int(tc.hidden_size))
    except PlanMismatchError as exc:
        raise PlanMismatchError(f"{exc} or add replan=true to re-plan for this checkpoint", setting="model") from None
    rope.check_scaling(plan.model.rope_scaling, tc)
    if int(tc.vocab_size) != plan.model.vocab_size:
        raise PlanMismatchError(f"the plan's vocabulary has {plan.model.vocab_size} tokens but the model's has "
                                f"{tc.vocab_size}; re-plan with the matching model= or add replan=true",
                                setting="model")


def plan_model_settings(model: Any) -> dict[str, Any]:
    """The loaded model's dims as plan config settings (dotted keys), for re-planning on a mismatch."""
    cfg = model.config
    tc = getattr(cfg, "text_config", cfg)
    vc = cfg.vision_config
    heads = int(tc.num_attention_heads)
    rope = getattr(tc, "rope_parameters", None) or {}
    family = family_of(cfg.model_type)
    if family == "internvl3":
        return _internvl_settings(cfg, tc, vc)
    out: dict[str, Any] = {
        "model.name": f"{family}-checkpoint", "model.family": family, "model.num_layers": int(tc.num_hidden_layers),
        "model.hidden_size": int(tc.hidden_size), "model.intermediate_size": int(tc.intermediate_size),
        "model.num_heads": heads, "model.num_kv_heads": int(tc.num_key_value_heads),
        "model.head_dim": int(tc.hidden_size) // heads, "model.vocab_size": int(tc.vocab_size),
        "model.vision.patch_size": int(vc.patch_size), "model.vision.spatial_merge": int(vc.spatial_merge_size),
        "model.vision.temporal_patch": int(vc.temporal_patch_size), "model.vision.depth": int(vc.depth),
        "model.vision.num_heads": int(vc.num_heads),
    }
    if "mrope_section" in rope:
        out["model.mrope_section"] = [int(x) for x in rope["mrope_section"]]
    if "rope_theta" in rope:
        out["model.rope_theta"] = float(rope["rope_theta"])
    out.update(_rope_settings(tc))
    if family == "qwen2_5_vl":
        out.update({"model.vision.hidden_size": int(vc.hidden_size),
                    "model.vision.intermediate_size": int(vc.intermediate_size),
                    "model.vision.out_hidden_size": int(vc.out_hidden_size),
                    "model.tokens_per_second": int(vc.tokens_per_second)})
    else:
        out.update({"model.vision.hidden_size": int(vc.embed_dim),
                    "model.vision.intermediate_size": int(vc.embed_dim * vc.mlp_ratio),
                    "model.vision.out_hidden_size": int(vc.hidden_size)})
    return out


def _internvl_settings(cfg: Any, tc: Any, vc: Any) -> dict[str, Any]:
    """plan_model_settings for an InternVL checkpoint (tile = the ViT's image size)."""
    heads = int(tc.num_attention_heads)
    rope = getattr(tc, "rope_parameters", None) or {}
    tile = vc.image_size[0] if isinstance(vc.image_size, (list, tuple)) else vc.image_size
    patch = vc.patch_size[0] if isinstance(vc.patch_size, (list, tuple)) else vc.patch_size
    out = {"model.name": "internvl-checkpoint", "model.family": "internvl3", "model.num_layers": int(tc.num_hidden_layers),
           "model.hidden_size": int(tc.hidden_size), "model.intermediate_size": int(tc.intermediate_size),
           "model.num_heads": heads, "model.num_kv_heads": int(tc.num_key_value_heads),
           "model.head_dim": int(tc.hidden_size) // heads, "model.vocab_size": int(tc.vocab_size),
           "model.vision.patch_size": int(patch), "model.vision.tile_size": int(tile),
           "model.vision.tile_tokens": (int(tile) // int(patch) // 2) ** 2, "model.vision.temporal_patch": 1,
           "model.vision.spatial_merge": 2, "model.vision.frame_text_tokens": 6,
           "model.vision.depth": int(vc.num_hidden_layers), "model.vision.num_heads": int(vc.num_attention_heads),
           "model.vision.hidden_size": int(vc.hidden_size), "model.vision.intermediate_size": int(vc.intermediate_size),
           "model.vision.out_hidden_size": int(tc.hidden_size)}
    if "rope_theta" in rope:
        out["model.rope_theta"] = float(rope["rope_theta"])
    out.update(_rope_settings(tc))
    return out


def _rope_settings(tc: Any) -> dict[str, Any]:
    """The text config's RoPE scaling as plan settings."""
    spec = rope.model_scaling(tc)
    return {"model.rope_scaling.rope_type": spec.rope_type, "model.rope_scaling.factor": spec.factor,
            "model.max_position_embeddings": spec.original_max_positions}


def random_from_checkpoint(checkpoint: str, *, dtype: torch.dtype, device: torch.device | str, seed: int = 0) -> Any:
    """Random weights with a checkpoint's architecture (its config.json; no weights are read)."""
    import transformers

    family = checkpoint_family(checkpoint)
    try:
        config = transformers.AutoConfig.from_pretrained(checkpoint)
    except Exception as exc:  # noqa: BLE001 - a broken config.json
        raise InputError(f"cannot read the config of {checkpoint!r}: {_first_line(exc)}",
                         setting="model.checkpoint") from None
    torch.manual_seed(seed)
    with torch.device(device):
        model = _model_class(family)._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()
