"""Shape arithmetic of the vision towers: work units, FLOPs, parameters and activation sizes.

The vision encoder never attends across temporal grids (Qwen2-VL family) or frames (InternVL3), so
its natural unit of work is one grid / one frame tile; the frame-parallel encoder (SPAVA_SPEC.md
section 2) hands each rank a contiguous range of units.

Architectures modelled (numbers from the Hugging Face configs these YAML files mirror):
- qwen2_vl: Conv3d patch embed (3 x temporal_patch x 14 x 14 -> hidden), ``depth`` blocks of
  LayerNorm + full attention over the grid + 2-matrix GELU MLP, then a merger (LayerNorm, MLP
  4*hidden -> 4*hidden -> out_hidden) on each 2x2 patch group.
- qwen2_5_vl: the same with a 3-matrix SwiGLU MLP and window attention (112-pixel windows, i.e.
  64 patches) except in QWEN25_FULL_ATTENTION_LAYERS blocks, which attend over the whole grid.
- internvl3: InternViT (class token + 1024 patches per 448x448 tile, full attention, 2-matrix
  MLP), pixel shuffle to 256 tokens of 4*hidden, then a projector 4*hidden -> out -> out.
"""
from __future__ import annotations

from dataclasses import dataclass

from spava_plan.config import ModelConfig

IN_CHANNELS = 3
QWEN25_FULL_ATTENTION_LAYERS = 4  # fullatt_block_indexes = [7, 15, 23, 31]
QWEN25_WINDOW_PATCHES = 64  # 112-pixel windows of 14-pixel patches: 8 x 8
# The encoder runs whole units in chunks of about this many patches (units are independent), so
# its activations stay bounded however many frames a rank encodes.
VISION_CHUNK_PATCHES = 65536


@dataclass(frozen=True)
class VisionUnit:
    """One unit of vision work (a temporal grid, or a frame tile) and the LLM tokens it yields."""

    patches: int  # ViT sequence length of one unit
    tokens: int  # LLM tokens it produces
    units: int  # units in the whole video


def vision_unit(model: ModelConfig, grid_thw: tuple[int, int, int]) -> VisionUnit:
    vis = model.vision
    t, rows, cols = grid_thw
    if model.family == "internvl3":
        side = vis.tile_size // vis.patch_size
        return VisionUnit(patches=side * side + 1, tokens=vis.tile_tokens, units=t)
    merge = vis.spatial_merge * vis.spatial_merge
    return VisionUnit(patches=rows * cols * merge, tokens=rows * cols, units=t)


@dataclass(frozen=True)
class VisionGemm:
    """One linear layer applied to ``rows`` rows: (rows, inp) @ (inp, out)."""

    rows: int
    inp: int
    out: int


def unit_gemms(model: ModelConfig, unit: VisionUnit) -> list[VisionGemm]:
    """Every GEMM of the tower for one unit (patch embed, all blocks, merger / projector)."""
    vis = model.vision
    h, inter, p = vis.hidden_size, vis.intermediate_size, unit.patches
    mlp_mats = 3 if model.family == "qwen2_5_vl" else 2
    if model.family == "internvl3":
        patch_in = IN_CHANNELS * vis.patch_size ** 2
    else:
        patch_in = IN_CHANNELS * vis.temporal_patch * vis.patch_size ** 2
    gemms = [VisionGemm(p, patch_in, h)]
    per_block = [VisionGemm(p, h, 3 * h), VisionGemm(p, h, h)]
    if mlp_mats == 3:
        per_block += [VisionGemm(p, h, 2 * inter), VisionGemm(p, inter, h)]
    else:
        per_block += [VisionGemm(p, h, inter), VisionGemm(p, inter, h)]
    gemms += per_block * vis.depth
    merged_in = h * vis.spatial_merge ** 2
    if model.family == "internvl3":
        gemms += [VisionGemm(unit.tokens, merged_in, vis.out_hidden_size),
                  VisionGemm(unit.tokens, vis.out_hidden_size, vis.out_hidden_size)]
    else:
        gemms += [VisionGemm(unit.tokens, merged_in, merged_in),
                  VisionGemm(unit.tokens, merged_in, vis.out_hidden_size)]
    return gemms


def unit_attention_pairs(model: ModelConfig, unit: VisionUnit) -> float:
    """(query, key) pairs the tower's attention computes for one unit, summed over blocks
    (non-causal; multiply by 4 * hidden for FLOPs)."""
    vis, p = model.vision, unit.patches
    if model.family == "qwen2_5_vl":
        full = min(QWEN25_FULL_ATTENTION_LAYERS, vis.depth)
        window = min(p, QWEN25_WINDOW_PATCHES)
        return float(full * p * p + (vis.depth - full) * p * window)
    return float(vis.depth * p * p)


def vision_params(model: ModelConfig) -> int:
    """Parameters of the vision tower including its merger / projector."""
    vis = model.vision
    h, inter = vis.hidden_size, vis.intermediate_size
    unit = VisionUnit(patches=1, tokens=1, units=1)
    weights = sum(g.inp * g.out for g in unit_gemms(model, unit))
    biases = sum(g.out for g in unit_gemms(model, unit))
    norms = vis.depth * 2 * 2 * h + 2 * h * vis.spatial_merge ** 2
    if model.family == "internvl3":
        side = vis.tile_size // vis.patch_size
        norms += (side * side + 1) * h + h  # position embedding and class token
    return weights + biases + norms


def unit_pixel_elements(model: ModelConfig, unit: VisionUnit) -> int:
    """Pixel values of one unit as the encoder takes them (its patch-embedding input)."""
    first = unit_gemms(model, unit)[0]
    return first.rows * first.inp


def chunk_units(unit: VisionUnit) -> int:
    """Whole units the encoder runs per call (written to the Plan as Chunking.vision_units)."""
    return max(1, min(unit.units, VISION_CHUNK_PATCHES // unit.patches))


def chunk_activation_elements(model: ModelConfig, unit: VisionUnit, units: int | None = None) -> int:
    """Elements live while one chunk of ``units`` units runs through a block: the larger of the
    attention phase and the MLP phase, which both hold the residual, the normed input and the
    block input (6 hidden-sized rows with q/k/v and the attention output) and, in the MLP, three
    intermediates at once (SwiGLU: act(gate), up, product; Qwen2-VL's QuickGELU: fc1 output,
    sigmoid, product). Checked against torch.cuda.max_memory_allocated on an H100 (Qwen2-VL-7B
    and Qwen2.5-VL towers at 720p / 1440p: within 5%)."""
    vis = model.vision
    units = chunk_units(unit) if units is None else units
    rows = units * unit.patches
    return rows * (6 * vis.hidden_size + 3 * vis.intermediate_size)
