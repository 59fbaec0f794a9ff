"""method=dense_tp at run time: one rank of a Megatron-style tensor-parallel dense model.

``tp_model(model, plan, rank)`` builds rank r's shard from the real Hugging Face model by slicing its
weights (spava_plan/tp_shards.py says which rows): the language model's q/k/v projections by head
with their biases, o_proj's columns of those heads, the MLP's gate/up rows and down columns; the
ViT's fused qkv (or q/k/v) by head, its output projection and MLP the same way. A row-parallel
layer's bias is kept on rank 0 only (zeros elsewhere), so the sum adds it once. Everything else
(embeddings, norms, LM head, patch embedding, merger / projector) is shared with the full model's
own tensors, so W shards in one process (emulated ranks) add only the sliced weights. With
model.init=random the full model is built on the meta device only, and each rank's shard gets its
own random weights there and then (transformers' initialize_weights, RoPE buffers included). Forward
hooks all-reduce the hidden states through the communicator after each attention and each MLP of
every decoder layer and ViT block: the two all-reduces per layer. A ViT rank with no head (W above
the tower's heads) contributes zeros.

The shard runs transformers' stock modules (the fused elementwise kernels of vision_fused /
llm_fused are not installed on it: their fused residual GEMMs would hide the points the
all-reduces need); chunking (runtime/vision/chunking.py) applies as for every method. ``TPAttention`` is the
rank's attention: exact causal SDPA over the whole prompt with its heads (whatever backend an outer
``sdpa_kernel`` selects), its heads' KV cache for decode. ``TPRankRunner`` is RankRunner with the
shard and the tensor-parallel vision stage (every rank encodes every unit with its shard).
"""
from __future__ import annotations

import copy
import threading
import weakref
from typing import Any

import torch
import torch.nn.functional as F

from spava_plan.errors import PlanMismatchError
from spava_plan.plan import Plan
from spava_plan.tp_shards import TPShard, model_shards

from .comm import Communicator
from .generate import RankRunner
from .hf.attention import language_model, text_config
from .hf.inputs import ModelInputs
from .kv_cache import KVCacheShard
from .vision.parallel import visual_embeddings
from .vision.tower import vision_module

_SHARDS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()  # model -> {(W, rank): shard}
# Emulated ranks build their shards from their own threads: one at a time, so a random shard's
# seeded init does not share the global generator with another rank's
_BUILD = threading.Lock()


# -- slicing --------------------------------------------------------------------------------------
def _param(t: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(t.detach().clone().contiguous(), requires_grad=False)


def _out_rows(lin: torch.nn.Linear, rows: torch.Tensor) -> None:
    """Column-parallel: keep output features ``rows`` (weight rows and bias)."""
    lin.weight = _param(lin.weight.index_select(0, rows.to(lin.weight.device)))
    if lin.bias is not None:
        lin.bias = _param(lin.bias.index_select(0, rows.to(lin.bias.device)))
    lin.out_features = int(rows.numel())


def _in_cols(lin: torch.nn.Linear, cols: torch.Tensor, rank: int) -> None:
    """Row-parallel: keep input features ``cols``; the bias is added by rank 0 only."""
    lin.weight = _param(lin.weight.index_select(1, cols.to(lin.weight.device)))
    if lin.bias is not None:
        lin.bias = _param(lin.bias if rank == 0 else torch.zeros_like(lin.bias))
    lin.in_features = int(cols.numel())


def _heads(span: tuple[int, int], head_dim: int, offset: int = 0) -> torch.Tensor:
    return torch.arange(offset + span[0] * head_dim, offset + span[1] * head_dim)


def _span(span: tuple[int, int]) -> torch.Tensor:
    return torch.arange(span[0], span[1])


class _NoHeads(torch.nn.Module):
    """The attention of a ViT rank that holds no head: it contributes zeros to the all-reduce."""

    def __init__(self, pair: bool):
        super().__init__()
        self.pair = pair  # InternViT's attention returns (output, weights)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = torch.zeros_like(hidden_states)
        return (out, None) if self.pair else out


def _llm_layer(layer: Any, s: TPShard, head_dim: int) -> None:
    attn, mlp = layer.self_attn, layer.mlp
    _out_rows(attn.q_proj, _heads(s.q_heads, head_dim))
    _out_rows(attn.k_proj, _heads(s.kv_heads, head_dim))
    _out_rows(attn.v_proj, _heads(s.kv_heads, head_dim))
    _in_cols(attn.o_proj, _heads(s.q_heads, head_dim), s.rank)
    attn.num_heads, attn.num_key_value_heads = s.num_heads, s.num_kv_heads
    attn.num_key_value_groups = s.num_heads // s.num_kv_heads
    cols = _span(s.mlp)
    _out_rows(mlp.gate_proj, cols)
    _out_rows(mlp.up_proj, cols)
    _in_cols(mlp.down_proj, cols, s.rank)
    mlp.intermediate_size = s.intermediate


def _vit_mlp(mlp: Any, s: TPShard) -> None:
    cols = _span(s.vit_mlp)
    if hasattr(mlp, "gate_proj"):  # Qwen2.5-VL: SwiGLU
        _out_rows(mlp.gate_proj, cols)
        _out_rows(mlp.up_proj, cols)
        _in_cols(mlp.down_proj, cols, s.rank)
    else:  # Qwen2-VL, InternViT: fc1 -> act -> fc2
        _out_rows(mlp.fc1, cols)
        _in_cols(mlp.fc2, cols, s.rank)


def _vit_attention(block: Any, name: str, s: TPShard, heads: int) -> None:
    """Slice the block's attention ``name`` (Qwen: fused qkv + proj; InternViT: q/k/v + projection_layer)."""
    attn = getattr(block, name)
    fused = hasattr(attn, "qkv")
    dim = attn.qkv.in_features if fused else attn.q_proj.in_features
    head_dim = dim // heads
    if s.vit_num_heads == 0:
        setattr(block, name, _NoHeads(pair=not fused))
        return
    if fused:  # rows [q | k | v], each dim wide
        rows = torch.cat([_heads(s.vit_heads, head_dim, offset=i * dim) for i in range(3)])
        _out_rows(attn.qkv, rows)
        _in_cols(attn.proj, _heads(s.vit_heads, head_dim), s.rank)
    else:
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
            _out_rows(lin, _heads(s.vit_heads, head_dim))
        _in_cols(attn.projection_layer, _heads(s.vit_heads, head_dim), s.rank)
        attn.embed_dim = s.vit_num_heads * head_dim
    attn.num_heads = s.vit_num_heads


def _vit_blocks(model: Any) -> tuple[list[Any], str, int]:
    """(blocks, attention attribute, heads) of the vision tower."""
    if getattr(model.config, "model_type", None) == "internvl":
        tower = getattr(model, "model", model).vision_tower
        return list(tower.encoder.layer), "attention", int(tower.config.num_attention_heads)
    visual = vision_module(model)
    return list(visual.blocks), "attn", int(visual.config.num_heads)


def _stock_copy(model: Any) -> Any:
    """A copy of the module tree sharing every tensor with ``model``, with the runtime's per-instance
    forward patches (chunking, fused kernels) and their state removed: transformers' own modules."""
    memo: dict[int, Any] = {}
    for m in model.modules():
        for t in list(m._parameters.values()) + list(m._buffers.values()) + list(m.__dict__.values()):
            if isinstance(t, torch.Tensor) and not t.is_meta:  # a meta model's copy gets its own tensors
                memo[id(t)] = t
    shard = copy.deepcopy(model, memo)
    for m in shard.modules():
        m.__dict__.pop("forward", None)
        for k in [k for k in m.__dict__ if k.startswith("_spava_")]:
            del m.__dict__[k]
    return shard


def tp_model(model: Any, plan: Plan, rank: int, device: torch.device | str = "cpu") -> Any:
    """Rank ``rank``'s shard of ``model`` under a dense_tp plan (cached per model, world and rank). A
    model on the meta device (model.init=random) gives a shard with its own random weights on
    ``device``, built without the full model ever existing."""
    if plan.method != "dense_tp":
        raise PlanMismatchError(f"a tensor-parallel shard needs a method=dense_tp plan, not {plan.method}",
                                setting="method")
    with _BUILD:
        cache = _SHARDS.setdefault(model, {})
        key = (plan.world_size, rank)
        if key not in cache:
            cache[key] = _build(model, plan, rank, torch.device(device))
        return cache[key]


def _build(model: Any, plan: Plan, rank: int, device: torch.device) -> Any:
    s = model_shards(plan.model, plan.world_size)[rank]
    tc = text_config(model)
    if int(tc.num_attention_heads) != plan.model.num_heads or int(tc.intermediate_size) != plan.model.intermediate_size:
        raise PlanMismatchError(f"the dense_tp plan shards {plan.model.num_heads} heads and an MLP of "
                                f"{plan.model.intermediate_size} but the model has {tc.num_attention_heads} and "
                                f"{tc.intermediate_size}; re-plan for this model", setting="model")
    shard = _stock_copy(model)
    for layer in language_model(shard).layers:
        _llm_layer(layer, s, plan.model.head_dim)
    blocks, attn_name, heads = _vit_blocks(shard)
    for block in blocks:
        _vit_attention(block, attn_name, s, heads)
        _vit_mlp(block.mlp, s)
    if any(p.is_meta for p in shard.parameters()):  # model.init=random: this rank's own random shard
        shard.to_empty(device=device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(rank)
            shard.initialize_weights()  # transformers' own init (buffers such as RoPE frequencies included)
        shard.eval()
    shard._spava_tp = _TPState(s)
    _install_reduces(shard, shard._spava_tp, blocks, attn_name)
    return shard


# -- the all-reduces --------------------------------------------------------------------------------
class _TPState:
    """A shard's rank layout and the communicator its all-reduces go through (set by the runner
    that uses it: a shard is cached, its runners are made per request)."""

    def __init__(self, shard: TPShard):
        self.shard = shard
        self.comm: Communicator | None = None


def _reducer(state: _TPState, tag: str) -> Any:
    def hook(module: Any, args: Any, out: Any) -> None:
        if state.comm is None:
            raise PlanMismatchError("a dense_tp shard ran outside TPRankRunner (no communicator for its "
                                    "all-reduces)", setting="method")
        state.comm.all_reduce(out[0] if isinstance(out, tuple) else out, tag=tag)
    return hook


def _install_reduces(shard: Any, state: _TPState, blocks: list[Any], attn_name: str) -> None:
    """Forward hooks all-reducing each attention's and MLP's output, once per shard."""
    for layer in language_model(shard).layers:
        layer.self_attn.register_forward_hook(_reducer(state, "reduce_attn"))
        layer.mlp.register_forward_hook(_reducer(state, "reduce_mlp"))
    for block in blocks:
        getattr(block, attn_name).register_forward_hook(_reducer(state, "reduce_vision"))
        block.mlp.register_forward_hook(_reducer(state, "reduce_vision"))


# -- attention --------------------------------------------------------------------------------------
class TPAttention:
    """Exact causal attention of one tensor-parallel rank over the whole prompt with its own heads,
    and its heads' KV cache (the hf_attention interface's RankAttention-like object)."""

    def __init__(self, plan: Plan, rank: int, decode_capacity: int = 256):
        self.plan, self.rank = plan, rank
        self.decode_capacity = decode_capacity
        self.prompt = plan.layout.total_tokens
        self.caches: list[KVCacheShard | None] = [None] * plan.model.num_layers

    def set_prompt_tokens(self, n: int) -> None:
        """The real prompt length (query padding is the sequence's end: no real row sees it causally)."""
        self.prompt = int(n)

    @staticmethod
    def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        """(n, Hq, D) x (m, Hkv, D) -> (n, Hq, D); causal aligns the last row with the last key."""
        group = q.shape[1] // k.shape[1]
        if group > 1:  # the KV heads repeated for their q heads: every SDPA backend takes that (not all take GQA)
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        qt, kt, vt = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        n, m = q.shape[0], k.shape[0]
        mask = None
        if causal and 1 < n != m:  # bottom-right causal (decode of several tokens; one token sees every key)
            mask = torch.ones(n, m, dtype=torch.bool, device=q.device).tril(m - n)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, is_causal=causal and n == m)
        return out[0].transpose(0, 1)

    def prefill(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = self._sdpa(q, k, v, causal=True)
        self.caches[layer] = KVCacheShard([(k[:self.prompt], v[:self.prompt])], self.decode_capacity)
        return out

    def decode(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cache = self.caches[layer]
        if cache is None:
            raise PlanMismatchError(f"rank {self.rank}: decode of layer {layer} before its prefill", setting="layer")
        cache.append(k, v)
        return self._sdpa(q, cache.k, cache.v, causal=True)


# -- the runner -------------------------------------------------------------------------------------
class TPRankRunner(RankRunner):
    """RankRunner on the rank's shard: the same prefill, first token and decode (every rank holds
    the whole prompt, so every rank computes the logits; rank 0 picks the token)."""

    def __init__(self, model: Any, plan: Plan, comm: Communicator, device: torch.device | str,
                 decode_capacity: int = 256):
        shard = tp_model(model, plan, comm.rank, device)
        if shard._spava_tp.shard.world != comm.world_size:
            raise PlanMismatchError(f"the dense_tp shard is for {shard._spava_tp.shard.world} ranks but "
                                    f"{comm.world_size} run it", setting="gpus")
        shard._spava_tp.comm = comm
        super().__init__(shard, plan, comm, lambda: TPAttention(plan, comm.rank, decode_capacity), device)

    def vision(self, inputs: ModelInputs) -> torch.Tensor:
        """Every video embedding: the whole video through the rank's shard of the tower."""
        return visual_embeddings(self.visual, inputs.pixel_values_videos, inputs.video_grid_thw)
