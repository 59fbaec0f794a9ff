"""Peak device memory of every rank during prefill, and the check that it fits.

A rank's memory has two phases that never overlap:
- vision stage: while encoding, the rank's pixels on the device, the encoder's activations for
  one chunk of units and the embeddings of the units this rank encodes; then, during the
  exchange (spava_plan/vision_exchange.py), those embeddings, the rows it sends and the
  embeddings of its OWN local video tokens (not every rank's), so the stage grows with the
  rank's share of the video, not with the whole video;
- LLM stage: the KV cache shard (complete at the last layer), one layer's activations, the
  passing buffers (selection all-gathers, or the ring's K/V buffers, and a broadcast anchor's
  receive buffer) and the query all-gather.
Weights (LLM and vision tower, in the run dtype) are resident throughout, so

    peak = weights + max(vision_stage, kv_cache + activations + passing + gather)

One layer's activations on n local tokens (hidden h, q heads Hq, kv heads Hkv, head dim D, MLP
chunk c, intermediate I) are the larger of two phases. Both hold the input embeddings
(transformers' decoder loop keeps ``inputs_embeds`` alive through every layer) and the layer's
input (held by the loop while the layer runs):
- attention: the normed input, q, k, v, and during M-RoPE four q-sized tensors at once (q,
  q*cos, rotate_half(q)*sin and their sum): 3nh + 4nHqD + 2nHkvD, plus the fp32 softmax state
  of LSE-merged rows and the selection scores;
- MLP: the post-attention residual, the normed input, the MLP's preallocated output, one chunk's
  down-projection output and three chunk intermediates (act(gate), up and their product): 5nh +
  ch + 3cI.
The runtime runs the MLP and the RMSNorms in chunks of ``Plan.chunking.mlp_tokens`` tokens and
the vision tower in chunks of ``Plan.chunking.vision_units`` whole units (runtime/vision/chunking.py):
without chunking a single 1M-token MLP intermediate alone would exceed any GPU, and every RMSNorm
would add two full-sequence fp32 copies. The sum is conservative: passing buffers are counted
during the MLP phase too. These terms were checked against torch.cuda.max_memory_allocated of
single ranks on an H100 (benchmarks/results/2026-11-25-h100-scale.md).
"""
from __future__ import annotations

from spava_plan.config import SpavaConfig
from spava_plan.errors import InfeasiblePlanError
from spava_plan.plan import Chunking, Collective, RankPlan
from spava_plan.vision_exchange import VisionExchange

from .cost import LSE_BYTES
from .vision import VisionUnit, chunk_activation_elements, chunk_units, unit_pixel_elements, vision_params

MLP_CHUNK_TOKENS = 16384
# The caching allocator reserves more than it hands out. With expandable segments (spava_plan.entry.run
# sets PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True unless told otherwise) single ranks on an
# H100 reserved 4-6% above their max_memory_allocated (12-18% with the default allocator), so a
# plan fits when its peak plus this slack fits the usable memory.
ALLOCATOR_SLACK = 0.06
GIB = 1 << 30
PARTS = ("weights", "kv_cache", "activations", "passing", "gather", "vision_stage")


def llm_params(cfg: SpavaConfig) -> int:
    """Parameters of the language model: embeddings, layers (q/k/v with bias), head."""
    m = cfg.model
    h, d = m.hidden_size, m.head_dim
    q, kv = m.num_heads * d, m.num_kv_heads * d
    layer = h * (q + 2 * kv) + (q + 2 * kv) + q * h + 3 * h * m.intermediate_size + 2 * h
    embed = m.vocab_size * h
    return embed + m.num_layers * layer + h + (0 if m.tie_word_embeddings else embed)


def plan_chunking(unit: VisionUnit) -> Chunking:
    """The chunk sizes this memory model assumes, written into the Plan for the runtime to use."""
    return Chunking(mlp_tokens=MLP_CHUNK_TOKENS, vision_units=chunk_units(unit))


def weight_bytes(cfg: SpavaConfig) -> int:
    return (llm_params(cfg) + vision_params(cfg.model)) * cfg.dtype_bytes


def _activations(cfg: SpavaConfig, rank: RankPlan, ring: bool, chunking: Chunking) -> int:
    m, dt = cfg.model, cfg.dtype_bytes
    n = rank.local_tokens
    h, d = m.hidden_size, m.head_dim
    merged_rows = sum(t.rows for t in rank.tasks if t.merge == "query")
    fp32_rows = n if ring else merged_rows  # ring LSE-merges every row across steps
    scores = max((stop - start for _, start, stop, keep in rank.select if keep < stop - start), default=0)
    q, kv = n * m.num_heads * d, 2 * n * m.num_kv_heads * d
    attention = (3 * n * h + 4 * q + kv) * dt \
        + fp32_rows * m.num_heads * (d + 1) * LSE_BYTES + 2 * scores * m.num_kv_heads * LSE_BYTES
    c = min(n, chunking.mlp_tokens)
    mlp = (5 * n * h + c * h + 3 * c * m.intermediate_size) * dt
    return max(attention, mlp)


def _comm_buffers(collectives: tuple[Collective, ...], world: int, hosts: int = 1) -> tuple[int, int]:
    """(passing, gather) bytes: all-gather outputs hold ``world`` contributions; the ring keeps
    the K/V block it sends and the one it receives; the global-passing scan keeps, per host, its
    candidates, its state (the passing buffer at the end), a send and a receive slot of one message
    each, plus one merge's 2-message concatenation (runtime/passing_scan.py); a broadcast anchor
    one buffer of its packed K|V on every rank (rank 0 packs what it sends, the others receive)."""
    passing = gather = 0
    for c in collectives:
        if c.kind == "select_scan":
            message = c.bytes_per_rank // max(1, hosts)
            passing += 4 * c.bytes_per_rank + 2 * message
        elif c.kind == "select_all_gather":
            passing += world * c.bytes_per_rank
        elif c.kind == "ring":
            passing += 2 * c.bytes_per_rank
        elif c.kind == "all_reduce":
            continue  # in place (NCCL): the hidden states are counted with the activations
        elif c.kind == "anchor_broadcast":
            passing += c.bytes_per_rank
        else:
            gather += world * c.bytes_per_rank
    return passing, gather


def _vision_stage(cfg: SpavaConfig, unit: VisionUnit, ex: VisionExchange, rank: int, chunking: Chunking) -> int:
    """The larger of the encoding (this rank's pixels on the device + one encoder chunk's
    activations + its own embeddings) and the exchange (its own embeddings + the send buffer +
    its local rows, and a staging buffer where the all-to-all output cannot land in place); a
    single rank that holds every video token keeps its own embeddings and exchanges nothing."""
    dt = cfg.dtype_bytes
    row = cfg.model.hidden_size * dt
    g0, g1 = ex.grids[rank]
    own = (g1 - g0) * unit.tokens * row
    units = min(chunking.vision_units, g1 - g0)
    encode = (g1 - g0) * unit_pixel_elements(cfg.model, unit) * dt \
        + chunk_activation_elements(cfg.model, unit, units) * dt + own
    exchange = 0
    if not ex.identity(rank):
        staged = 0 if ex.in_place(rank) else ex.recv_rows(rank)
        exchange = own + (ex.send_rows(rank) + ex.local_rows(rank) + staged) * row
    return max(encode, exchange)


def rank_memory(cfg: SpavaConfig, rank: RankPlan, collectives: tuple[Collective, ...], world: int,
                unit: VisionUnit, exchange: VisionExchange, weights: int,
                chunking: Chunking | None = None, vision_stage: int | None = None) -> dict[str, int]:
    """Peak bytes of one rank with its parts (keys: PARTS and "peak"). ``vision_stage``: the
    encoder's peak when the frame-parallel one does not apply (dense_tp: planner/dense_tp.py)."""
    m, dt = cfg.model, cfg.dtype_bytes
    chunking = plan_chunking(unit) if chunking is None else chunking
    cache_tokens = sum(stop - start for start, stop in rank.cache)
    ring = any(c.kind == "ring" for c in collectives)
    passing, gather = _comm_buffers(collectives, world, len(rank.hosts))
    parts = {
        "weights": weights,
        "kv_cache": cache_tokens * m.num_layers * 2 * m.num_kv_heads * m.head_dim * dt,
        "activations": _activations(cfg, rank, ring, chunking),
        "passing": passing,
        "gather": gather,
        "vision_stage": (_vision_stage(cfg, unit, exchange, rank.rank, chunking) if vision_stage is None
                         else vision_stage),
    }
    llm = parts["kv_cache"] + parts["activations"] + parts["passing"] + parts["gather"]
    parts["peak"] = weights + max(parts["vision_stage"], llm)
    return parts


def fits_device(cfg: SpavaConfig, peak: int) -> bool:
    """A rank whose allocations peak at ``peak`` bytes fits, allocator slack included."""
    return peak * (1 + ALLOCATOR_SLACK) <= usable_bytes(cfg)


def usable_bytes(cfg: SpavaConfig) -> int:
    t = cfg.topology
    return int((t.memory_gib - t.reserved_gib) * GIB)


def check_fits(cfg: SpavaConfig, method: str, world: int, memory: list[dict[str, int]]) -> None:
    """Raise InfeasiblePlanError naming the setting to change when some rank does not fit."""
    cap = usable_bytes(cfg)
    t = cfg.topology
    worst = max(range(len(memory)), key=lambda r: memory[r]["peak"])
    parts = memory[worst]
    if fits_device(cfg, parts["peak"]):
        return
    usable = (f"topology {t.name} has {cap / GIB:.1f} GiB usable per GPU (less {ALLOCATOR_SLACK:.0%} allocator "
              f"slack)")
    if parts["weights"] > cap:
        raise InfeasiblePlanError(f"topology={t.name}: the weights of {cfg.model.name} alone need "
                                  f"{parts['weights'] / GIB:.1f} GiB but {usable}; choose a topology with more "
                                  f"memory", setting="topology")
    detail = ", ".join(f"{k.replace('_', ' ')} {parts[k] / GIB:.1f}" for k in PARTS if parts[k])
    need = f"rank {worst} needs {parts['peak'] / GIB:.1f} GiB ({detail}) but {usable}"
    if method == "dense" or world == 1:
        raise InfeasiblePlanError(f"frames={cfg.video.frames} does not fit one GPU: {need}; lower frames or "
                                  f"video.resolution, or choose a topology with more memory", setting="frames")
    raise InfeasiblePlanError(f"gpus={world} does not fit: {need}; change gpus, lower frames or "
                              f"video.resolution, or choose a topology with more memory", setting="gpus")
