"""Roofline cost model: time of every kind of work on the plan's device and links.

Every piece of work is charged ``max(FLOPs / rate, bytes / HBM bandwidth)`` with the rates of the
topology config (measured rates where the YAML says so), plus a fixed launch overhead per kernel
that the schedule adds per op. Times are in microseconds.

- Attention: 4 * pairs * D * Hq FLOPs, where pairs counts the (row, key) scores a task computes:
  rows * keys for a "full" source, the exact bottom-right causal triangle for a "causal" one.
  Compute is charged on query rows padded to 128-row tiles (FlashAttention-class kernels work in
  such tiles), bytes are Q, K, V and O read/written once (L2 absorbs the K/V re-reads).
- GEMMs of the LLM layer (qkv, o_proj, gate/up/down) and of the vision tower: 2*m*n*k FLOPs at the
  GEMM rate; bytes = weights + inputs + outputs. Norms, RoPE, residuals and the SwiGLU product
  are memory-bound elementwise kernels.
- Selection: one GEMV per KV head (score), a max-pool, a top-k and a gather-pack, all memory
  bound.
- Communication: spava_plan/links.py, the one model of it (the plan carries its ``Links`` and the
  emulated runtime charges with the same code).

Not modelled: SM contention between NCCL and compute kernels, clock throttling, the embedding
lookup and the single-token LM head (negligible next to a prefill of many thousand tokens).
"""
from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

from spava_plan.config import ModelConfig, TopologyConfig
from spava_plan.plan import DTYPE_BYTES
from spava_plan.passing_scan import scan_time_us
from spava_plan.links import ALL_GATHER, ALL_REDUCE, ALL_TO_ALL, BROADCAST, P2P, Links, plan_links
from spava_plan.vision_exchange import VisionExchange

from .vision import VisionUnit, unit_attention_pairs, unit_gemms

ATTN_TILE_ROWS = 128  # query-row tile of FlashAttention-class kernels
LSE_BYTES = DTYPE_BYTES["fp32"]  # fp32 log-sum-exp / partials

# Kernel launches behind each compute op of the schedule (the schedule charges one overhead each).
KERNELS = {"qkv": 3, "out_mlp": 6, "attend": 1, "merge": 1, "select_block": 4, "vision_unit": 0, "scan_merge": 4}


class Work(NamedTuple):
    """Predicted time of some work and the FLOPs and bytes behind it (a tuple: the schedule
    creates millions of these for large ring baselines)."""

    us: float = 0.0
    flops: float = 0.0
    bytes: float = 0.0

    def __add__(self, other: "Work") -> "Work":  # type: ignore[override]
        return Work(self.us + other.us, self.flops + other.flops, self.bytes + other.bytes)

    def times(self, n: float) -> "Work":
        """The work done ``n`` times (``n * work`` would repeat the tuple)."""
        return Work(self.us * n, self.flops * n, self.bytes * n)


ZERO = Work()


def visible_pairs(rows: int, keys: int, causal: bool) -> float:
    """Scores a task computes against one key source: all of them, or the bottom-right causal
    triangle (row i of M sees key j of n iff j <= i + n - M)."""
    if not causal:
        return float(rows) * keys
    if keys >= rows:
        return float(rows) * (keys - rows) + rows * (rows + 1) / 2
    return keys * (keys + 1) / 2  # rows above the diagonal see nothing


def topology_links(topology: TopologyConfig, world: int) -> Links:
    """Ranks of a plan on one node talk over NVLink; across nodes the network is the bottleneck."""
    return plan_links(world=world, gpus=topology.gpus, nodes=topology.num_nodes, gpus_per_node=topology.gpus_per_node,
                      intra_node_gbps=topology.intra_node_gbps, inter_node_gbps=topology.inter_node_gbps,
                      link_latency_us=topology.link_latency_us)


class CostModel:
    """Costs of one model on one topology at one dtype, for a plan on ``world`` ranks."""

    def __init__(self, model: ModelConfig, topology: TopologyConfig, dtype_bytes: int, world: int):
        self.model = model
        self.topology = topology
        self.dt = dtype_bytes
        self.world = world
        self.gemm_rate = topology.gemm_tflops * 1e6  # FLOP per microsecond
        self.attn_rate = topology.attention_tflops * 1e6
        self.hbm = topology.hbm_gbps * 1e3  # bytes per microsecond
        self.launch_us = topology.launch_overhead_us
        self.links: Links = topology_links(topology, world)
        # Per-instance memos: the same token counts and task shapes recur on every rank and step.
        self._attention: dict[tuple, Work] = {}
        self.qkv = lru_cache(maxsize=None)(self.qkv)  # type: ignore[method-assign]
        self.out_mlp = lru_cache(maxsize=None)(self.out_mlp)  # type: ignore[method-assign]
        self.select = lru_cache(maxsize=None)(self.select)  # type: ignore[method-assign]

    # -- primitives -----------------------------------------------------------------------------
    def _roof(self, flops: float, nbytes: float, rate: float) -> Work:
        return Work(max(flops / rate, nbytes / self.hbm), flops, nbytes)

    def gemm(self, rows: int, inp: int, out: int) -> Work:
        flops = 2.0 * rows * inp * out
        return self._roof(flops, float(inp * out + rows * (inp + out)) * self.dt, self.gemm_rate)

    def elementwise(self, elements: float) -> Work:
        """Memory-bound kernels touching ``elements`` values (reads + writes) in the run dtype."""
        return Work(elements * self.dt / self.hbm, 0.0, elements * self.dt)

    # -- attention ------------------------------------------------------------------------------
    def attention(self, rows: int, sources: tuple[tuple[int, bool], ...]) -> Work:
        """One attention task: ``rows`` query rows against key sources (keys, causal)."""
        key = (rows, sources)
        hit = self._attention.get(key)
        if hit is None:
            hit = self._attention[key] = self._attention_uncached(rows, sources)
        return hit

    def _attention_uncached(self, rows: int, sources: tuple[tuple[int, bool], ...]) -> Work:
        m = self.model
        if rows <= 0 or not sources:
            return ZERO
        pairs = sum(visible_pairs(rows, keys, causal) for keys, causal in sources)
        keys = sum(k for k, _ in sources)
        flops = 4.0 * pairs * m.head_dim * m.num_heads
        padded = -(-rows // ATTN_TILE_ROWS) * ATTN_TILE_ROWS
        nbytes = (2.0 * rows * m.num_heads * m.head_dim + 2.0 * keys * m.num_kv_heads * m.head_dim) * self.dt
        return Work(max(flops * padded / rows / self.attn_rate, nbytes / self.hbm), flops, nbytes)

    # -- the LLM layer's per-token work -----------------------------------------------------------
    def qkv(self, tokens: int) -> Work:
        """Input RMSNorm, the q/k/v projection and RoPE on q and k, for ``tokens`` tokens."""
        m = self.model
        qkv_out = (m.num_heads + 2 * m.num_kv_heads) * m.head_dim
        rope = 2.0 * tokens * (m.num_heads + m.num_kv_heads) * m.head_dim
        return self.elementwise(2.0 * tokens * m.hidden_size) + self.gemm(tokens, m.hidden_size, qkv_out) \
            + self.elementwise(rope)

    def out_mlp(self, tokens: int) -> Work:
        """o_proj, residual, post-attention RMSNorm, SwiGLU MLP and residual."""
        m = self.model
        h, inter = m.hidden_size, m.intermediate_size
        return (self.gemm(tokens, m.num_heads * m.head_dim, h) + self.elementwise(3.0 * tokens * h)
                + self.elementwise(2.0 * tokens * h) + self.gemm(tokens, h, 2 * inter)
                + self.elementwise(3.0 * tokens * inter) + self.gemm(tokens, inter, h)
                + self.elementwise(3.0 * tokens * h))

    def layer_tokens(self, tokens: int) -> Work:
        """All per-token work of one layer (what a virtual host's rows cost besides attention)."""
        return self.qkv(tokens) + self.out_mlp(tokens)

    # -- selection and merging ------------------------------------------------------------------
    def anchor(self, rows: int) -> Work:
        """One layer of the anchor's own rows: their causal self-attention and per-token work (what
        a rank saves per layer when the anchor's K/V are broadcast to it instead)."""
        return self.attention(rows, ((rows, True),)) + self.layer_tokens(rows) if rows else ZERO

    def select(self, block: int, keep: int, query_rows: int) -> Work:
        """Score, pool, top-k and pack one block (keep == block: a plain copy of K|V)."""
        m = self.model
        hkv, d = m.num_kv_heads, m.head_dim
        pack = 2.0 * keep * hkv * 2 * d * self.dt  # gather-read and write the packed K|V
        if keep >= block:
            return Work(pack / self.hbm, 0.0, pack)
        qbar = float(query_rows * m.num_heads * d * self.dt)  # mean of the query rows per KV head
        score_flops = 2.0 * block * hkv * d
        scores = block * hkv * LSE_BYTES
        nbytes = qbar + block * hkv * d * self.dt + scores + 2 * scores + 2 * scores + pack
        return Work(nbytes / self.hbm, score_flops, nbytes)

    def scan_merge(self, keep: int) -> Work:
        """One round of the global-passing scan on one host: sort the 2*keep candidates per KV head
        (received | own) by (score, position) and gather the best keep rows (memory bound: the
        side rows are read by the sorts, K|V read and written once)."""
        m = self.model
        hkv, d = m.num_kv_heads, m.head_dim
        side = 2.0 * keep * hkv * 16  # fp64 (score, position) of both sets
        kv = 2.0 * keep * hkv * 2 * d * self.dt  # read both sets' K|V rows
        nbytes = 4 * side + kv + keep * hkv * 2 * d * self.dt  # two stable sorts, the gather's read + write
        return Work(nbytes / self.hbm, 0.0, nbytes)

    def merge(self, rows: int, parts: int) -> Work:
        """LSE-merge of ``parts`` fp32 (out, lse) partials of ``rows`` query rows."""
        m = self.model
        read = float(parts * rows * m.num_heads * (m.head_dim + 1) * LSE_BYTES)
        write = float(rows * m.num_heads * m.head_dim * self.dt)
        return Work((read + write) / self.hbm, 4.0 * parts * rows * m.num_heads * m.head_dim, read + write)

    # -- communication --------------------------------------------------------------------------
    def all_gather(self, bytes_per_rank: float, world: int | None = None) -> float:
        return self.links.transfer_us(ALL_GATHER, bytes_per_rank, self.world if world is None else world)

    def all_reduce(self, nbytes: float) -> float:
        """Sum of an ``nbytes`` tensor over the ranks (dense_tp's hidden states)."""
        return self.links.transfer_us(ALL_REDUCE, nbytes, self.world)

    def broadcast(self, nbytes: float) -> float:
        return self.links.transfer_us(BROADCAST, nbytes, self.world)

    def all_to_all(self, busiest_bytes: float) -> float:
        """``busiest_bytes``: the most off-rank bytes one rank sends or receives."""
        return self.links.transfer_us(ALL_TO_ALL, busiest_bytes, self.world)

    def vision_exchange(self, ex: VisionExchange, row_bytes: int) -> float:
        """The frame-parallel encoder's exchange: a broadcast per shared piece, then the all-to-all
        (all blocking, one after the other, as the runtime issues them)."""
        shared = sum(self.broadcast((b - a) * row_bytes) for _, a, b in ex.shared)
        return shared + self.all_to_all(ex.busiest_rows() * row_bytes)

    def scan(self, bytes_per_rank: float, hosts: int) -> float:
        """The whole global-passing scan (spava_plan/passing_scan.py, the one formula)."""
        return scan_time_us(self.links, bytes_per_rank, hosts, self.world)

    def p2p(self, nbytes: float) -> float:
        return self.links.transfer_us(P2P, nbytes, self.world)

    # -- vision tower ---------------------------------------------------------------------------
    def vision_unit(self, unit: VisionUnit) -> Work:
        """Encoding one temporal grid (or frame tile): every GEMM, the attention and the
        memory-bound norms / activations of the tower."""
        vis = self.model.vision
        work = ZERO
        for g in unit_gemms(self.model, unit):
            work = work + self.gemm(g.rows, g.inp, g.out)
        pairs = unit_attention_pairs(self.model, unit)
        flops = 4.0 * pairs * vis.hidden_size
        work = work + Work(flops / self.attn_rate, flops, 0.0)
        per_block = unit.patches * (10.0 * vis.hidden_size + 3.0 * vis.intermediate_size)
        return work + self.elementwise(vis.depth * per_block)
