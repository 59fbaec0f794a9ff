"""Every rank rotates with the frequencies the stock model uses for the whole sequence.

transformers' dynamic NTK RoPE (InternVL3's ``rope_type: dynamic``) rescales the rotary
frequencies from the largest position id of each forward pass (``dynamic_rope_update``): in the
stock model that is the whole prompt at prefill and the new token at each decode step, and the
frequencies fall back to the original ones while the sequence is within
``max_position_embeddings``. A rank sees only its own rows (and a padded query segment holds
positions past the real prompt), so left alone each rank would pick its own frequencies.

``install(model, spec)`` wraps the language model's rotary module once; inside
``sequence_length(n)`` (the runner's prefill and decode calls) it computes cos/sin with the
frequencies of a sequence of ``n`` positions: transformers' own rope init function, given the seq
length as the stock update gives it (an int64 tensor), then the stock forward unchanged. It keeps
no state between calls, so W ranks emulated as threads may share one model, and each request gets
the frequencies of a freshly loaded stock model (the stock module remembers the longest sequence
it has seen across requests; a fresh one starts at max_position_embeddings). Outside
``sequence_length`` the stock module runs as it is.

default and linear scaling do not depend on the sequence: the stock module is already the same on
every rank, and nothing is wrapped.
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
import inspect
from typing import Any, Iterator

import torch

from spava_plan.errors import PlanMismatchError
from spava_plan.plan import RopeScalingSpec

# The seq length (largest position id + 1) of the current runner call; per thread / context.
_SEQ_LEN: contextvars.ContextVar[int | None] = contextvars.ContextVar("spava_rope_seq_len", default=None)


@contextlib.contextmanager
def sequence_length(n: int) -> Iterator[None]:
    """Rotate as the stock model does for a sequence whose largest position id is ``n - 1``."""
    token = _SEQ_LEN.set(int(n))
    try:
        yield
    finally:
        _SEQ_LEN.reset(token)


def rope_parameters(spec: RopeScalingSpec, rope_theta: float, mrope_section: tuple[int, ...] | None) -> dict:
    """transformers' ``rope_parameters`` for the plan's scaling (random-weight configs, checks)."""
    params: dict[str, Any] = {"rope_type": spec.rope_type, "rope_theta": float(rope_theta)}
    if spec.rope_type != "default":
        params["factor"] = float(spec.factor)
    if mrope_section is not None:
        params["mrope_section"] = [int(x) for x in mrope_section]
    return params


def model_scaling(text_config: Any) -> RopeScalingSpec:
    """The RoPE scaling a transformers text config declares (transformers 5's rope_parameters)."""
    params = getattr(text_config, "rope_parameters", None) or {}
    rope_type = str(params.get("rope_type", "default"))
    factor = float(params.get("factor", 1.0)) if rope_type != "default" else 1.0
    return RopeScalingSpec(rope_type=rope_type, factor=factor,  # type: ignore[arg-type]
                           original_max_positions=int(text_config.max_position_embeddings))


def check_scaling(spec: RopeScalingSpec, text_config: Any) -> None:
    """The model rotates as the plan says (PlanMismatchError naming model.rope_scaling otherwise).
    original_max_positions only matters to dynamic scaling."""
    got = model_scaling(text_config)
    same = got.rope_type == spec.rope_type and got.factor == spec.factor
    if spec.rope_type == "dynamic":
        same = same and got.original_max_positions == spec.original_max_positions
    if not same:
        raise PlanMismatchError(
            f"the plan's RoPE scaling is {spec.rope_type} (factor {spec.factor:g}, max_position_embeddings "
            f"{spec.original_max_positions}) but the model's is {got.rope_type} (factor {got.factor:g}, "
            f"max_position_embeddings {got.original_max_positions}); re-plan with model.rope_scaling.rope_type="
            f"{got.rope_type} model.rope_scaling.factor={got.factor:g} model.max_position_embeddings="
            f"{got.original_max_positions} or add replan=true", setting="model.rope_scaling")


class _Frequencies:
    """The stock module as its undecorated forward sees it, with other frequencies."""

    def __init__(self, module: torch.nn.Module, inv_freq: torch.Tensor, attention_scaling: float):
        self._module, self.inv_freq, self.attention_scaling = module, inv_freq, attention_scaling

    def __getattr__(self, name: str) -> Any:  # mrope_section, recomposition_frequencies, config...
        return getattr(self._module, name)


class SequenceRotary(torch.nn.Module):
    """The stock rotary module, rotating with the frequencies of ``sequence_length``'s n."""

    def __init__(self, stock: torch.nn.Module, spec: RopeScalingSpec):
        super().__init__()
        self.stock = stock
        self.original_max = int(spec.original_max_positions)
        # the plan's scaling, on a copy of the model's config (the init function reads it from there)
        config = copy.copy(stock.config)
        config.rope_parameters = dict(stock.config.rope_parameters, rope_type=spec.rope_type, factor=float(spec.factor))
        config.max_position_embeddings = self.original_max
        self.rope_config = config
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        self.init_fn = ROPE_INIT_FUNCTIONS[spec.rope_type]
        self.plain_forward = inspect.unwrap(type(stock).forward)  # without dynamic_rope_update

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = _SEQ_LEN.get()
        if n is None:
            return self.stock(x, position_ids)
        if n <= self.original_max:  # the stock module's original frequencies (its reset)
            freqs = _Frequencies(self.stock, self.stock.original_inv_freq, self.stock.attention_scaling)
        else:
            # as dynamic_rope_update calls it: seq_len = max(position_ids) + 1, an int64 tensor
            seq_len = torch.tensor(n, dtype=torch.long, device=x.device)
            inv_freq, scaling = self.init_fn(self.rope_config, x.device, seq_len=seq_len)
            freqs = _Frequencies(self.stock, inv_freq, scaling)
        return self.plain_forward(freqs, x, position_ids)


def install(lm: torch.nn.Module, spec: RopeScalingSpec) -> None:
    """Check the model rotates as the plan says; wrap ``lm.rotary_emb`` for dynamic scaling
    (idempotent; nothing to wrap otherwise)."""
    rot = lm.rotary_emb
    if isinstance(rot, SequenceRotary):
        return
    check_scaling(spec, rot.config)
    if spec.rope_type == "dynamic":
        lm.rotary_emb = SequenceRotary(rot, spec)
