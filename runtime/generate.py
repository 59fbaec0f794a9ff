"""Prefill and greedy decode of one rank under a plan (SPAVA_SPEC.md sections 2, 6, 7).

    vision   frame-parallel ViT (vision.parallel=one_gpu: the whole ViT on rank 0), then each rank receives the visual embeddings of its own local
             video tokens only (broadcasts of the rows every rank holds + one all_to_all_single)
    prefill  the rank's local sequence [anchor | its blocks | query] through the stock decoder
             layers, Spava attention via the attention interface (runtime/hf/attention.py), exact global
             M-RoPE ids (InternVL3: 1-D ids); the query rows come out identical on every rank
    token 1  lm_head on the LAST query row only, greedy argmax on rank 0, broadcast
    decode   each new token is replicated on every rank; per layer RankAttention.decode attends the
             rank's KV cache shard, all-gathers and LSE-merges (exact), one rank appends the new
             K/V; argmax on rank 0, broadcast, so every rank produces the same text

Timing marks synchronise the device (CUDA) before reading the clock.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from spava_plan.plan import Plan
from spava_plan.vision_exchange import plan_vision_exchange

from .vision import chunking
from . import rope
from .comm import Communicator
from .hf.attention import SpavaCall, install, language_model
from .hf.inputs import ModelInputs, local_embeddings, local_indices, slice_positions
from .vision.parallel import encode_video_parallel
from .vision.tower import vision_module


@dataclass
class Timing:
    vision_s: float = 0.0  # frame-parallel ViT + the embedding exchange
    prefill_s: float = 0.0  # embeddings + language model over the local sequence + last-row logits
    first_token_s: float = 0.0  # from the start of vision to the first token on every rank
    decode_s: float = 0.0  # every token after the first
    decode_tokens: int = 0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0


@dataclass
class GenerationResult:
    tokens: list[int]  # greedy tokens, the first one from prefill (eos included when reached)
    # (vocab,) fp32 logits of the last prompt token; None on a rank that does not hold that token
    # (zigzag_ring: only the rank with the last chunk; every rank for the replicated-query methods)
    first_logits: torch.Tensor | None
    timing: Timing = field(default_factory=Timing)


@dataclass
class PrefillOutput:
    hidden: torch.Tensor  # (n_local, hidden) final-norm hidden states of the local rows
    index: torch.Tensor  # (n_local,) global token of every local row
    last_row: int | None  # local row of the last prompt token (None: not on this rank)


class RankRunner:
    """One rank's model execution under a plan. ``make_attention()`` returns a fresh RankAttention
    (its KV cache lives for one prompt)."""

    def __init__(self, model: Any, plan: Plan, comm: Communicator, make_attention: Callable[[], Any],
                 device: torch.device | str):
        # The language model must route attention through Spava (idempotent): without this the
        # stock attention would run on the rank's local rows alone, ignoring the plan.
        self.model, self.plan, self.comm = install(model), plan, comm
        # Activations bounded as planner/memory.py assumes (MLP, norms and vision tower in chunks).
        chunking.install(model, plan.chunking)
        self.rank_plan = plan.ranks[comm.rank]
        self.make_attention = make_attention
        self.device = torch.device(device)
        self.lm = language_model(model)
        # dynamic RoPE: every rank rotates with the whole sequence's frequencies (runtime/rope.py)
        rope.install(self.lm, plan.model.rope_scaling)
        self.visual = vision_module(model)
        self.merge = plan.video.spatial_merge
        self.exchange = plan_vision_exchange(plan)
        # InternVL3's language model (Qwen2) takes 1-D position ids (1, n); Qwen2-VL's M-RoPE (3, 1, n)
        self.one_d = plan.model.family == "internvl3"
        self.attention: Any = None
        self.source = self._source(plan.layout.total_tokens)

    def _source(self, prompt_tokens: int) -> int:
        """The lowest rank holding the last prompt token: it picks each token and broadcasts it."""
        last = prompt_tokens - 1
        return min(r.rank for r in self.plan.ranks if any(a <= last < b for a, b in r.local))

    # -- timing -----------------------------------------------------------------------------------
    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    # -- stages -----------------------------------------------------------------------------------
    def vision(self, inputs: ModelInputs) -> torch.Tensor:
        """This rank's local video embeddings, in local order. Pixels stay on the host; each rank
        moves only its own temporal grids to the device."""
        return encode_video_parallel(self.visual, inputs.pixel_values_videos, inputs.video_grid_thw, self.comm,
                                     self.exchange, self.merge,
                                     self.plan.video.temporal_patch, hidden=self.plan.model.hidden_size,
                                     pixel_grids=inputs.pixel_grids)

    def embed(self, inputs: ModelInputs, video_embeds: torch.Tensor) -> torch.Tensor:
        """(n_local, hidden) input embeddings of this rank's local rows (text + its video rows)."""
        index = local_indices(self.rank_plan, device=self.device)
        return local_embeddings(self.lm.get_input_embeddings(), _to(inputs, self.device), video_embeds, index)

    def prefill(self, inputs: ModelInputs, positions: torch.Tensor, video_embeds: torch.Tensor) -> PrefillOutput:
        return self.prefill_embedded(self.embed(inputs, video_embeds), positions, inputs.prompt_tokens)

    def prefill_embedded(self, emb: torch.Tensor, positions: torch.Tensor,
                         prompt_tokens: int | None = None) -> PrefillOutput:
        """``prompt_tokens``: the real prompt length when the query segment is padded (hf_inputs.pad_query)."""
        n = self.plan.layout.total_tokens if prompt_tokens is None else int(prompt_tokens)
        index = local_indices(self.rank_plan, device=self.device)
        pos = slice_positions(positions.to(self.device), index)
        if self.one_d:
            pos = pos[0]
        self.attention = self.make_attention()
        if n != self.plan.layout.total_tokens:
            self.attention.set_prompt_tokens(n)
        self.source = self._source(n)
        # the stock model's RoPE sequence length: the real prompt's largest position + 1 (no query padding)
        with rope.sequence_length(int(positions[..., :n].max()) + 1):
            out = self.lm(inputs_embeds=emb.unsqueeze(0), position_ids=pos, use_cache=False,
                          spava=SpavaCall(self.attention, "prefill"))
        last = n - 1
        held = any(a <= last < b for a, b in self.rank_plan.local)
        return PrefillOutput(out.last_hidden_state[0], index, self.rank_plan.local_offset(last) if held else None)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden).float()

    def pick(self, logits: torch.Tensor | None, sampler: Callable[[torch.Tensor], int] | None = None) -> int:
        """The next token, chosen on the source rank (greedy, or ``sampler(logits)``) and broadcast:
        every rank continues with the same token, so sampling needs no agreement on random state."""
        if self.comm.rank == self.source:
            assert logits is not None, "the source rank holds the last prompt token"
            if sampler is None:
                token = torch.argmax(logits, dim=-1).reshape(1).to(torch.long)
            else:
                token = torch.tensor([int(sampler(logits))], dtype=torch.long, device=self.device)
        else:
            token = torch.zeros(1, dtype=torch.long, device=self.device)
        self.comm.broadcast(token, src=self.source)
        return int(token.item())

    def decode_step(self, token: int, position: int) -> torch.Tensor:
        """Hidden state of one new token at ``position`` (all three M-RoPE components equal)."""
        ids = torch.tensor([token], device=self.device)
        emb = self.lm.get_input_embeddings()(ids).unsqueeze(0)
        pos = torch.full((1, 1) if self.one_d else (3, 1, 1), position, dtype=torch.long, device=self.device)
        with rope.sequence_length(position + 1):  # as the stock decode step: its own position + 1
            out = self.lm(inputs_embeds=emb, position_ids=pos, use_cache=False,
                          spava=SpavaCall(self.attention, "decode"))
        return out.last_hidden_state[0, -1]

    # -- the whole request ------------------------------------------------------------------------
    def go_on(self, verdict: bool) -> bool:
        """Rank 0's verdict (continue decoding?) broadcast to every rank."""
        flag = torch.tensor([1 if verdict else 0], dtype=torch.long, device=self.device)
        self.comm.broadcast(flag, src=0, tag="control")
        return bool(flag.item())

    def generate(self, inputs: ModelInputs, positions: torch.Tensor, max_new_tokens: int,
                 eos_ids: Sequence[int] = (), sampler: Callable[[torch.Tensor], int] | None = None,
                 on_token: Callable[[list[int]], bool] | None = None) -> GenerationResult:
        """Prefill and decode one prompt. ``sampler`` (used on the source rank only) replaces greedy
        argmax; ``on_token(tokens)`` (every rank passes one, or none does) is called after each new
        token and rank 0's answer decides for all ranks whether decoding goes on (a server streams
        and cancels through it)."""
        timing = Timing()
        # The previous request's KV cache goes now, not when prefill makes the next one: kept, it
        # would sit beside this request's vision stage (8 GB at a 170K-token rank of a 7B model).
        self.attention = None
        t0 = self._now()
        # The video rows become input embeddings right away, so no reference keeps them alive
        # through the language model (at scale the anchor's rows alone are gigabytes per rank).
        emb = self.embed(inputs, self.vision(inputs))
        t1 = self._now()
        pre = self.prefill_embedded(emb, positions, inputs.prompt_tokens)
        del emb
        first_logits = None if pre.last_row is None else self.logits(pre.hidden[pre.last_row])
        t2 = self._now()
        token = self.pick(first_logits, sampler)
        t3 = self._now()
        timing.vision_s, timing.prefill_s, timing.first_token_s = t1 - t0, t2 - t1, t3 - t0
        tokens = [token]
        eos = set(int(e) for e in eos_ids)
        # Text after the prompt continues at (largest prompt position) + 1 on all three components.
        position = int(positions[:, :inputs.prompt_tokens].max()) + 1  # query padding excluded
        while len(tokens) < max_new_tokens and tokens[-1] not in eos:
            if on_token is not None and not self.go_on(on_token(tokens)):
                break
            hidden = self.decode_step(tokens[-1], position)
            tokens.append(self.pick(self.logits(hidden), sampler))
            position += 1
        if on_token is not None:
            on_token(tokens)  # the last token (the verdict no longer matters)
        t4 = self._now()
        timing.decode_s, timing.decode_tokens = t4 - t3, len(tokens) - 1
        return GenerationResult(tokens, first_logits, timing)


def _to(inputs: ModelInputs, device: torch.device) -> ModelInputs:
    if inputs.input_ids.device == device:
        return inputs
    return ModelInputs(inputs.input_ids.to(device), inputs.mm_token_type_ids.to(device), inputs.pixel_values_videos,
                       inputs.video_grid_thw, inputs.second_per_grid_ts, inputs.video_token_id, inputs.frame_size,
                       pad_tokens=inputs.pad_tokens, video_span=inputs.video_span, end_tokens=inputs.end_tokens,
                       pixel_grids=inputs.pixel_grids)
