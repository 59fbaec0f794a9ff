"""method=dense_tp: the dense model with Megatron-style tensor parallelism over all W GPUs (vLLM's
tensor_parallel_size=W), planned through the same path as every other method (planner/build.py).

Every rank holds the whole prompt and runs exact causal attention over it with its own heads
(spava_plan/tp_shards.py says which); its per-layer schedule is

    qkv -> attend -> o_proj, start:reduce_attn, wait:reduce_attn -> MLP, start:reduce_mlp, wait:reduce_mlp

(the all-reduces are on the critical path: the next op needs the summed hidden states). Costs are
the cost model's own formulas on the rank's shard of the model (``shard_model``): q/k/v, o_proj and
MLP GEMMs and attention FLOPs are 1/W of the dense model's (a replicated KV head counted on every
rank that holds it), norms, RoPE's hidden-sized work and residuals are done in full on every rank.
The ViT runs every unit of the video on every rank with its heads and MLP columns, two
all-reduces per block on the rows of each encoder chunk; patch embedding and merger replicated.
Memory: the rank's shard of the weights (embeddings, LM head, patch embedding and merger
replicated), KV of its KV heads for the whole prompt, full-sequence activations of its shard.
"""
from __future__ import annotations

import dataclasses

from spava_plan.config import ModelConfig, SpavaConfig
from spava_plan.links import ALL_REDUCE
from spava_plan.plan import AttnTask, Collective, KVRef, Placement, RankPlan
from spava_plan.tp_shards import TPShard, check_tp, model_shards

from .cost import CostModel, Work
from .partition import Partition
from .vision import VisionUnit, chunk_activation_elements, chunk_units, unit_attention_pairs, unit_gemms, \
    unit_pixel_elements

METHOD = "dense_tp"
REDUCES = ("reduce_attn", "reduce_mlp")  # the two per-layer all-reduces, in layer order


def is_tp(method: str) -> bool:
    return method == METHOD


def widest(shards: tuple[TPShard, ...]) -> TPShard:
    """The shard with the most work (ViT splits may be uneven; the LLM's are equal)."""
    return max(shards, key=lambda s: (s.num_heads, s.num_kv_heads, s.intermediate, s.vit_num_heads, s.vit_intermediate))


def shard_model(model: ModelConfig, world: int) -> ModelConfig:
    """The model one rank of a W-way tensor-parallel run holds (its widest shard): the cost and
    memory models' formulas applied to it give that rank's work."""
    check_tp(model.num_heads, model.num_kv_heads, model.intermediate_size, world)
    s = widest(model_shards(model, world))
    vision = dataclasses.replace(model.vision, num_heads=max(1, s.vit_num_heads),
                                 intermediate_size=max(1, s.vit_intermediate))
    return dataclasses.replace(model, num_heads=s.num_heads, num_kv_heads=s.num_kv_heads,
                               intermediate_size=s.intermediate, vision=vision)


def layer_cost_model(cfg: SpavaConfig, world: int) -> CostModel:
    """The cost model of one rank's layer work: the dense_tp shard's, the whole model otherwise."""
    model = shard_model(cfg.model, world) if is_tp(cfg.method.name) else cfg.model
    return CostModel(model, cfg.topology, cfg.dtype_bytes, world)


def partition(total_tokens: int, gpus: int) -> Partition:
    """One block, the whole prompt, which every rank holds (virtual host 0 is placed on rank 0)."""
    return Partition(METHOD, gpus, 1, None, ((0, total_tokens),), "block", 0, None, 0, 0)


def placement(host_us: float) -> Placement:
    return Placement(solver="zigzag", host_rank=(0,), host_cost=(host_us,), makespan=host_us, lower_bound=host_us)


def rank_plans(part: Partition) -> tuple[RankPlan, ...]:
    """Every rank: the whole prompt, one causal task over it, its heads' KV cache of every token,
    and it appends decoded tokens' K/V (each rank caches its own heads)."""
    span = part.blocks[0]
    task = AttnTask("host0", *span, kv=(KVRef(kind="local", mask="causal", start=span[0], stop=span[1]),))
    return tuple(RankPlan(rank=r, hosts=(0,) if r == 0 else (), local=(span,), tasks=(task,), select=(), cache=(span,),
                          decode_appends=True) for r in range(part.world))


def collectives(part: Partition, hidden_size: int, dtype_bytes: int) -> tuple[Collective, ...]:
    """The two all-reduces of the whole prompt's hidden states per layer."""
    tokens = part.blocks[0][1] - part.blocks[0][0]
    return tuple(Collective(name, "all_reduce", rows_per_rank=tokens, bytes_per_rank=tokens * hidden_size * dtype_bytes)
                 for name in REDUCES)


def vision_us(cfg: SpavaConfig, cost: CostModel, unit: VisionUnit) -> tuple[float, float]:
    """(encoder us, of which all-reduce us) of one rank: every unit with its shard of the tower,
    chunk by chunk as the runtime runs it (runtime/vision/chunking.py), two all-reduces per block."""
    full, shard = cfg.model, cost.model
    vis, svis = full.vision, shard.vision
    work = Work()
    gemms = unit_gemms(full, unit)
    assert len(gemms) == 1 + 4 * vis.depth + 2, "unit_gemms' layout: patch embedding, 4 per block, merger"
    work = work + cost.gemm(gemms[0].rows, gemms[0].inp, gemms[0].out)  # patch embedding (replicated)
    p, h = unit.patches, vis.hidden_size
    head_dim = vis.hidden_size // vis.num_heads
    heads_w = svis.num_heads * head_dim
    mlp_in = 2 * svis.intermediate_size if full.family == "qwen2_5_vl" else svis.intermediate_size
    block = cost.gemm(p, h, 3 * heads_w) + cost.gemm(p, heads_w, h) + cost.gemm(p, h, mlp_in) \
        + cost.gemm(p, svis.intermediate_size, h)
    work = work + block.times(vis.depth)
    for g in gemms[-2:]:  # merger / projector (replicated)
        work = work + cost.gemm(g.rows, g.inp, g.out)
    flops = 4.0 * unit_attention_pairs(full, unit) * heads_w
    work = work + Work(flops / cost.attn_rate, flops, 0.0)
    work = work + cost.elementwise(vis.depth * p * (10.0 * h + 3.0 * svis.intermediate_size))
    per_chunk = chunk_units(unit)
    chunks, rest = divmod(unit.units, per_chunk)
    def one(units: int) -> float:  # one all-reduce of a chunk's rows
        return cost.links.transfer_us(ALL_REDUCE, units * p * h * cost.dt, cost.world)

    reduce = 2 * vis.depth * (chunks * one(per_chunk) + (one(rest) if rest else 0.0))
    return unit.units * work.us + reduce, reduce


def llm_params(model: ModelConfig) -> int:
    """Parameters one rank holds of the language model (embeddings and LM head replicated)."""
    h, d = model.hidden_size, model.head_dim
    q, kv = model.num_heads * d, model.num_kv_heads * d
    layer = h * (q + 2 * kv) + (q + 2 * kv) + q * h + 3 * h * model.intermediate_size + 2 * h
    embed = model.vocab_size * h
    return embed + model.num_layers * layer + h + (0 if model.tie_word_embeddings else embed)


def vision_params(full: ModelConfig, shard: ModelConfig) -> int:
    """Parameters one rank holds of the tower: its heads' q/k/v/proj, its MLP columns; the patch
    embedding, norms and merger in full."""
    vis, svis = full.vision, shard.vision
    h = vis.hidden_size
    unit = VisionUnit(patches=1, tokens=1, units=1)
    gemms = unit_gemms(full, unit)
    head_dim = h // vis.num_heads
    heads_w = svis.num_heads * head_dim
    mats = 3 if full.family == "qwen2_5_vl" else 2
    block = h * 3 * heads_w + 3 * heads_w + heads_w * h + h + mats * h * svis.intermediate_size \
        + (mats - 1) * svis.intermediate_size + h + 4 * h
    replicated = sum(g.inp * g.out + g.out for g in (gemms[0], *gemms[-2:])) + 2 * h * vis.spatial_merge ** 2
    if full.family == "internvl3":
        side = vis.tile_size // vis.patch_size
        replicated += (side * side + 1) * h + h
    return vis.depth * block + replicated


def weight_bytes(cfg: SpavaConfig, world: int) -> int:
    shard = shard_model(cfg.model, world)
    return (llm_params(shard) + vision_params(cfg.model, shard)) * cfg.dtype_bytes


def vision_stage_bytes(cfg: SpavaConfig, world: int, unit: VisionUnit, units_per_chunk: int) -> int:
    """The encoder's peak on a rank: every unit's pixels on the device, one chunk's activations of
    its shard (the residual stream and norms in full) and the embeddings of the whole video."""
    dt = cfg.dtype_bytes
    shard = shard_model(cfg.model, world)
    pixels = unit.units * unit_pixel_elements(cfg.model, unit) * dt
    own = unit.units * unit.tokens * cfg.model.hidden_size * dt
    return pixels + chunk_activation_elements(shard, unit, min(units_per_chunk, unit.units)) * dt + own
