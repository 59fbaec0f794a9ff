"""Model inputs for Qwen2-VL / Qwen2.5-VL (InternVL3: runtime/hf/internvl_inputs.py): prompt ids, video pixels, exact global M-RoPE position
ids, the plan-vs-input check, and the per-rank slicing of the local sequence.

Pixels come from transformers' own fast video processor (``Qwen2VLVideoProcessor``, torchvision
ops) with ``device=`` the run's device: on a GPU the resize, rescale, normalisation and patchify run
there (0.195 s instead of 2.45 s on 16 CPU cores for 64 frames at 1440p, issue 25) and the pixels
stay there for the vision encoder. A checkpoint's processor (AutoProcessor: tokenizer + video
processor + chat template) builds everything; a random-weight run with no checkpoint builds the
same fast processor classes from their defaults (no files, no hub). Without torchvision (a CPU-only
machine with a torch that no torchvision build loads against) a CPU run falls back to the image
processor's PIL backend: every frame goes through the image processor's resize / rescale /
normalise and patch order, then frames are paired into temporal grids exactly as the video
processor's patchify does; the only difference is the resize library, within two uint8 levels
after normalisation (tests/test_fast_processors.py). A GPU run without torchvision is refused.

Frame size: the plan's pixel bounds (model.vision.min_pixels / max_pixels) and its per-frame pixel
cap rule (model.vision.cap_pixels_per_frame, transformers' keyword) are passed to the processor so
that the resized frame is the one the plan was made for; a transformers without the keyword (it
always caps) cannot build an uncapped plan's frames and is refused naming the setting.

Position ids are computed once over the WHOLE prompt with the model's own ``get_rope_index`` and
then sliced per rank, so every token keeps its true global position (SPAVA_SPEC.md section 1).
"""
from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from spava_plan.errors import InputError, PlanMismatchError
from spava_plan.plan import Plan, RankPlan

# The family-neutral parts (InternVL3's builder uses them too); callers reach them as hf_inputs.*.
from .internvl_inputs import (build_internvl_inputs, internvl_image_processor, internvl_video_processor,
                              synthetic_internvl_inputs)
from .model_inputs import ModelInputs, Processing, chat_prompt, check_question  # noqa: F401

VIDEO_PAD = "<|video_pad|>"
SPECIAL_MARKERS = ("<|video_pad|>", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_start|>",
                   "<|im_end|>", "<|endoftext|>")
# Qwen's chat layout, used only when a checkpoint ships no chat template.
FALLBACK_TEMPLATE_TEXT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                          "<|vision_start|><|video_pad|><|vision_end|>{question}<|im_end|>\n"
                          "<|im_start|>assistant\n")


# -- loading ------------------------------------------------------------------------------------
def fast_processors_available() -> bool:
    """Whether transformers' fast (torchvision) processors can run here: torchvision imports and its
    compiled ops load against this torch (a mismatched pair fails at import: "operator
    torchvision::nms does not exist")."""
    global _FAST
    if _FAST is None:
        try:
            import torchvision  # noqa: F401
            from transformers.utils import is_torchvision_available

            _FAST = bool(is_torchvision_available())
        except Exception:  # ImportError, or the RuntimeError of ops that do not load
            _FAST = False
    return _FAST


_FAST: bool | None = None


def processing_device(device: Any = None) -> str:
    """The processors' device: the given one ("cuda", "cuda:1", a torch.device, "cpu"), or the GPU when
    one is visible. A GPU needs the fast processors (InputError naming ``device`` without them)."""
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device in (None, "auto") else str(device)
    if dev.startswith("cuda") and not fast_processors_available():
        raise InputError("preprocessing on the GPU needs transformers' fast processors, which need torchvision "
                         "built for this torch (pip install torchvision matching torch " f"{torch.__version__}); or run "
                         "with device=cpu", setting="device")
    return dev


def load_processing(checkpoint: str, device: Any = None) -> Processing:
    """The checkpoint's processor (its fast video processor, on ``device``; see processing_device),
    or its tokenizer + image processor when the processor class cannot be built here (no
    torchvision; CPU only). InputError when neither loads."""
    import transformers

    path = Path(checkpoint)
    if not path.is_dir():
        raise InputError(f"no checkpoint directory at {checkpoint!r}", setting="model.checkpoint")
    dev = processing_device(device)
    try:
        proc = transformers.AutoProcessor.from_pretrained(str(path))
        if getattr(proc, "video_processor", None) is not None and getattr(proc, "tokenizer", None) is not None:
            template = getattr(proc, "chat_template", None) or getattr(proc.tokenizer, "chat_template", None)
            return Processing(proc.tokenizer, getattr(proc, "image_processor", None), proc.video_processor,
                              template, "processor", dev)
    except Exception:  # no torchvision, or a checkpoint without processor files: try the parts
        pass
    if dev.startswith("cuda"):
        raise InputError(f"cannot build the video processor of {checkpoint!r} (AutoProcessor), which GPU "
                         f"preprocessing needs", setting="model.checkpoint")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
        image_processor = transformers.AutoImageProcessor.from_pretrained(str(path))
    except Exception as exc:
        raise InputError(f"cannot load the tokenizer / image processor of {checkpoint!r}: "
                         f"{_first_line(exc)}", setting="model.checkpoint") from None
    template = getattr(tokenizer, "chat_template", None) or _template_file(path)
    return Processing(tokenizer, image_processor, None, template, "parts", dev)


def default_processing(tokenizer: Any = None, family: str = "qwen2_vl", tile_size: int = 448,
                       device: Any = None) -> Processing:
    """Processing for a random-weight model with no checkpoint: transformers' fast video and image
    processor classes built from their defaults (no files, no hub), on ``device``; no tokenizer (the
    prompt is then synthetic ids). InternVL3: its video processor with one square tile per frame.
    Without torchvision (CPU only): the image processor's PIL backend."""
    import transformers

    dev = processing_device(device)
    fast = fast_processors_available()
    if family == "internvl3":
        video = internvl_video_processor(tile_size) if fast else None
        return Processing(tokenizer, internvl_image_processor(tile_size, fast=fast), video, None, "default", dev)
    if fast:
        return Processing(tokenizer, transformers.Qwen2VLImageProcessor(), transformers.Qwen2VLVideoProcessor(),
                          None, "default", dev)
    cls = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
    return Processing(tokenizer, cls(), None, None, "default", dev)


def _template_file(path: Path) -> str | None:
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    js = path / "chat_template.json"
    if js.is_file():
        try:
            return json.loads(js.read_text()).get("chat_template")
        except (OSError, ValueError):
            return None
    return None


def _first_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[0].strip() if lines else type(exc).__name__


# -- prompt and pixels --------------------------------------------------------------------------
def prompt_text(processing: Processing, question: str) -> str:
    """The chat prompt with one video placeholder and the generation prompt."""
    check_question(question, SPECIAL_MARKERS)
    text = chat_prompt(processing, question, FALLBACK_TEMPLATE_TEXT)
    if processing.chat_template is not None and text.count(VIDEO_PAD) != 1:
        raise InputError(f"the checkpoint's chat template does not place exactly one {VIDEO_PAD} for a video",
                         setting="model.checkpoint")
    return text


def video_pixels(processing: Processing, frames: np.ndarray, *, min_pixels: int, max_pixels: int,
                 temporal_patch: int, cap_pixels_per_frame: bool = False,
                 max_video_tokens: int = 128000,
                 only_frames: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values_videos, video_grid_thw) for uint8 frames (F, H, W, 3): pixels float32 on the
    processing device, the grid on the host.

    ``only_frames`` = (first, last), whole temporal grids: only those frames go through the processor
    (one torchrun rank's grids, video_decode=own); their rows land in their place of the video's
    pixel tensor, whose other rows are allocated, never written (no rank reads another's grids:
    runtime/vision/parallel.py), and the grid is the whole video's. Each temporal grid's pixels
    depend on its own frames only (the same resize for every frame of the clip), so the rows are
    the whole video's; not with the per-frame pixel cap, whose size follows the frame count."""
    if only_frames is not None:
        return _grid_pixels(processing, frames, only_frames, min_pixels=min_pixels, max_pixels=max_pixels,
                            temporal_patch=temporal_patch, cap_pixels_per_frame=cap_pixels_per_frame,
                            max_video_tokens=max_video_tokens)
    size = {"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)}
    if processing.video_processor is not None:
        vp = processing.video_processor
        extra = cap_keyword(vp, cap_pixels_per_frame, max_video_tokens)
        # frames as decoded (F, H, W, 3) uint8: the layout transformers' own video loaders return;
        # as a tensor (a pinned decode buffer's view) so device= copies it by DMA
        video = torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
        out = vp(videos=[video], size=size, do_sample_frames=False, return_tensors="pt", device=processing.device,
                 **extra)
        return out["pixel_values_videos"].float(), out["video_grid_thw"].long().cpu()
    if processing.device.startswith("cuda"):
        raise InputError("preprocessing on the GPU needs transformers' fast video processor", setting="device")
    if cap_pixels_per_frame:
        raise InputError("the per-frame pixel cap needs transformers' video processor (torchvision); re-plan with "
                         "model.vision.cap_pixels_per_frame=false", setting="model.vision.cap_pixels_per_frame")
    return frames_to_video_patches(processing.image_processor, frames, size=size, temporal_patch=temporal_patch)


def _grid_pixels(processing: Processing, frames: np.ndarray, only: tuple[int, int], *, temporal_patch: int,
                 cap_pixels_per_frame: bool, **kw: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """video_pixels of the frames [first, last) only, placed in the whole video's pixel tensor."""
    first, last = int(only[0]), int(only[1])
    f, tp = int(frames.shape[0]), int(temporal_patch)
    if cap_pixels_per_frame or f % tp or first % tp or last % tp or not 0 <= first < last <= f:
        raise ValueError(f"frames {first}..{last} of {f} are not whole temporal grids of {tp} frames "
                         f"(or the per-frame pixel cap is on)")
    part, grid = video_pixels(processing, frames[first:last], temporal_patch=tp, cap_pixels_per_frame=False, **kw)
    per = part.shape[0] // int(grid[0, 0])  # pixel rows per temporal grid
    full = part.new_empty((f // tp * per, part.shape[1]))
    full[first // tp * per: last // tp * per] = part
    return full, torch.tensor([[f // tp, int(grid[0, 1]), int(grid[0, 2])]], dtype=grid.dtype)


def cap_keyword(video_processor: Any, cap_pixels_per_frame: bool, max_video_tokens: int = 128000) -> dict[str, Any]:
    """The ``cap_pixels_per_frame`` keyword for this transformers' video processor, set to the plan's
    rule. transformers 5.17-5.25 take it (unset: uncapped, with a warning); a release that dropped it
    always caps, so an uncapped plan cannot be served there: PlanMismatchError naming the setting."""
    accepted = "cap_pixels_per_frame" in getattr(getattr(video_processor, "valid_kwargs", None), "__annotations__", {})
    if accepted:
        return {"cap_pixels_per_frame": bool(cap_pixels_per_frame), "max_video_tokens": int(max_video_tokens)}
    import transformers

    if not cap_pixels_per_frame and _caps_always(transformers.__version__):
        raise PlanMismatchError(
            f"transformers {transformers.__version__}'s video processor always applies the per-frame pixel cap, "
            f"but the plan was made without it; re-plan with model.vision.cap_pixels_per_frame=true",
            setting="model.vision.cap_pixels_per_frame")
    if cap_pixels_per_frame and not _caps_always(transformers.__version__):
        raise PlanMismatchError(
            f"transformers {transformers.__version__}'s video processor has no per-frame pixel cap, but the plan "
            f"assumed it; re-plan with model.vision.cap_pixels_per_frame=false",
            setting="model.vision.cap_pixels_per_frame")
    return {"max_video_tokens": int(max_video_tokens)} if cap_pixels_per_frame else {}


def _caps_always(version: str) -> bool:
    """Releases without the keyword: before it existed (uncapped) or after its removal (capped, 5.22+
    announced; still present in 5.25)."""
    import re

    parts = tuple(int(x) for x in re.findall(r"\d+", version)[:2])
    return parts >= (5, 22)


def frames_to_video_patches(image_processor: Any, frames: np.ndarray, *, size: dict,
                            temporal_patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Video patches from the image processor: each frame is resized / normalised / patchified as an
    image (which repeats it over the temporal patch), then consecutive frames are paired into
    temporal grids in the video processor's layout (T, h/m, w/m, m, m | C, tp, ps, ps)."""
    out = image_processor(images=list(frames), size=size, return_tensors="pt")
    pixels, grids = out["pixel_values"], out["image_grid_thw"]
    _, gh, gw = (int(x) for x in grids[0])
    f = int(frames.shape[0])
    patch = int(image_processor.patch_size)
    tp_img = int(image_processor.temporal_patch_size)
    # (F, gh*gw, C, tp_img, ps, ps): every frame's copies over the temporal patch are identical
    per_frame = pixels.reshape(f, gh * gw, -1, tp_img, patch, patch)[:, :, :, 0]
    if pad := -f % temporal_patch:  # the video processor repeats the last frame
        per_frame = torch.cat([per_frame, per_frame[-1:].expand(pad, -1, -1, -1, -1)])
    t = per_frame.shape[0] // temporal_patch
    grid = per_frame.reshape(t, temporal_patch, gh * gw, -1, patch, patch).permute(0, 2, 3, 1, 4, 5)
    return grid.reshape(t * gh * gw, -1).float().contiguous(), torch.tensor([[t, gh, gw]], dtype=torch.long)


def build_inputs(processing: Processing, frames: np.ndarray, question: str, *, family: str, min_pixels: int,
                 max_pixels: int, temporal_patch: int, merge: int, fps: float,
                 video_token_id: int | None = None, tile_size: int = 448, tile_tokens: int = 256,
                 cap_pixels_per_frame: bool = False, max_video_tokens: int = 128000,
                 only_frames: tuple[int, int] | None = None) -> ModelInputs:
    """Prompt ids + pixels for one video and one question, as the model's processor builds them
    (``only_frames``: the pixels of those frames only, video_pixels)."""
    if family == "internvl3":
        return build_internvl_inputs(processing, frames, question, tile_size=tile_size, tile_tokens=tile_tokens,
                                     image_token_id=video_token_id)
    pixels, grid = video_pixels(processing, frames, min_pixels=min_pixels, max_pixels=max_pixels,
                                temporal_patch=temporal_patch, cap_pixels_per_frame=cap_pixels_per_frame,
                                max_video_tokens=max_video_tokens, only_frames=only_frames)
    n_video = int(grid.prod()) // (merge * merge)
    tok = processing.tokenizer
    text = prompt_text(processing, question).replace(VIDEO_PAD, VIDEO_PAD * n_video)
    ids = tok(text, return_tensors="pt")["input_ids"].long()
    vid = tok.convert_tokens_to_ids(VIDEO_PAD) if video_token_id is None else video_token_id
    if int((ids[0] == vid).sum()) != n_video:
        raise InputError(f"the tokenizer does not map {VIDEO_PAD} to one token id", setting="model.checkpoint")
    return _inputs(ids, pixels, grid, vid, family=family, fps=fps, temporal_patch=temporal_patch, merge=merge,
                   patch=int(processing.image_processor.patch_size) if processing.image_processor else 14)


def synthetic_inputs(processing: Processing, frames: np.ndarray, *, hf_config: Any, system_tokens: int,
                     question_tokens: int, family: str, min_pixels: int, max_pixels: int, temporal_patch: int,
                     merge: int, fps: float, seed: int = 0, tile_size: int = 448, tile_tokens: int = 256,
                     frame_text_tokens: int = 6, cap_pixels_per_frame: bool = False,
                     max_video_tokens: int = 128000, only_frames: tuple[int, int] | None = None) -> ModelInputs:
    """For a random-weight model with no tokenizer: the Qwen layout with random text ids
    (``only_frames``: the pixels of those frames only, video_pixels).

    [random system ids | <|vision_start|> | video | <|vision_end|> | random question ids | 5 suffix ids]
    """
    if family == "internvl3":
        return synthetic_internvl_inputs(processing, frames, hf_config=hf_config, system_tokens=system_tokens,
                                         question_tokens=question_tokens, tile_size=tile_size,
                                         tile_tokens=tile_tokens, frame_text_tokens=frame_text_tokens, seed=seed)
    pixels, grid = video_pixels(processing, frames, min_pixels=min_pixels, max_pixels=max_pixels,
                                temporal_patch=temporal_patch, cap_pixels_per_frame=cap_pixels_per_frame,
                                max_video_tokens=max_video_tokens, only_frames=only_frames)
    n_video = int(grid.prod()) // (merge * merge)
    specials = {int(getattr(hf_config, k)) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                                     "vision_end_token_id") if getattr(hf_config, k, None) is not None}
    vocab = int(hf_config.text_config.vocab_size)
    gen = torch.Generator().manual_seed(seed)

    def text_ids(n: int) -> torch.Tensor:
        ids = torch.randint(0, min(vocab, min(specials) if specials else vocab), (n,), generator=gen)
        return ids

    vid = int(hf_config.video_token_id)
    parts = [text_ids(max(0, system_tokens - 1)), torch.tensor([int(hf_config.vision_start_token_id)]),
             torch.full((n_video,), vid), torch.tensor([int(hf_config.vision_end_token_id)]),
             text_ids(question_tokens + 5)]
    ids = torch.cat(parts).long().unsqueeze(0)
    return _inputs(ids, pixels, grid, vid, family=family, fps=fps, temporal_patch=temporal_patch, merge=merge,
                   patch=int(processing.image_processor.patch_size))


def _inputs(ids, pixels, grid, vid, *, family, fps, temporal_patch, merge, patch) -> ModelInputs:
    video = torch.nonzero(ids[0] == vid)[:, 0]
    if video.numel() == 0 or int(video[-1] - video[0]) + 1 != video.numel():
        raise InputError("the prompt must hold the video as one contiguous run of video tokens (does the chat "
                         "template or the question add more?)", setting="question")
    mm = torch.where(ids == vid, 2, 0).to(torch.int32)
    # Qwen2.5-VL temporal positions: seconds per grid = temporal_patch / fps, with fps the sampled
    # frames' real rate (the processor's VideoMetadata.sampled_fps; the plan's video.fps for random frames).
    sec = torch.tensor([temporal_patch / fps], dtype=torch.float32) if family == "qwen2_5_vl" else None
    frame_size = (int(grid[0, 1]) * patch, int(grid[0, 2]) * patch)
    return ModelInputs(ids, mm, pixels, grid, sec, vid, frame_size)


# -- positions ----------------------------------------------------------------------------------
def global_position_ids(model: Any, inputs: ModelInputs) -> torch.Tensor:
    """(3, N) M-RoPE position ids of the whole prompt from the model's own get_rope_index.
    InternVL3 (1-D RoPE; its language model numbers the tokens 0..N-1): three equal rows."""
    if getattr(getattr(model, "config", None), "model_type", None) == "internvl":
        n = inputs.total_tokens
        return torch.arange(n, device=inputs.input_ids.device).unsqueeze(0).expand(3, n).contiguous()
    inner = getattr(model, "model", model)
    fn = getattr(inner, "get_rope_index", None) or getattr(model, "get_rope_index")
    params = inspect.signature(fn).parameters
    kwargs: dict[str, Any] = {"input_ids": inputs.input_ids, "video_grid_thw": inputs.video_grid_thw}
    optional = {"mm_token_type_ids": inputs.mm_token_type_ids, "image_grid_thw": None, "attention_mask": None,
                "second_per_grid_ts": inputs.second_per_grid_ts}
    kwargs.update({k: v for k, v in optional.items() if k in params})
    device = inputs.input_ids.device
    positions, _ = fn(**kwargs)
    return positions[:, 0].to(device=device, dtype=torch.long)


# -- question padding ---------------------------------------------------------------------------
def suffix_tokens(plan: Plan) -> int:
    """Tokens after the question in the query segment (the assistant prefix)."""
    return plan.layout.query_tokens - plan.video.max_question_tokens


def pad_query(plan: Plan, inputs: ModelInputs, positions: torch.Tensor) -> tuple[ModelInputs, torch.Tensor]:
    """Pad the query segment at its end up to the plan's capacity (``plan.video.max_question_tokens``).

    Pad rows repeat the last prompt token's id and continue its position ids by one per row (so the
    query segment's position bounds are the plan's for any question length); the runtime keeps them
    out of every real row's attention and out of the KV cache (runtime/attention.py). A prompt
    longer than the plan is refused naming video.max_question_tokens."""
    if inputs.pad_tokens:
        return inputs, positions
    lay = plan.layout
    question = inputs.total_tokens - lay.context_tokens - suffix_tokens(plan)
    if inputs.total_tokens > lay.total_tokens:
        raise PlanMismatchError(
            f"the question takes {question} tokens but the plan holds at most {plan.video.max_question_tokens}; shorten it "
            f"or re-plan with video.max_question_tokens={question} {REPLAN_HINT}", setting="video.max_question_tokens")
    pad = lay.total_tokens - inputs.total_tokens
    if pad == 0:
        return inputs, positions
    ids = torch.cat([inputs.input_ids, inputs.input_ids[:, -1:].expand(1, pad)], dim=1)
    mm = torch.cat([inputs.mm_token_type_ids, torch.zeros((1, pad), dtype=inputs.mm_token_type_ids.dtype,
                                                          device=inputs.mm_token_type_ids.device)], dim=1)
    steps = torch.arange(1, pad + 1, dtype=positions.dtype, device=positions.device)
    pos = torch.cat([positions, positions[:, -1:] + steps.unsqueeze(0)], dim=1)
    return dataclasses.replace(inputs, input_ids=ids, mm_token_type_ids=mm, pad_tokens=pad), pos


# -- the plan-vs-input check --------------------------------------------------------------------
REPLAN_HINT = "or add replan=true to re-plan for this input"


def check_against_plan(plan: Plan, inputs: ModelInputs, positions: torch.Tensor) -> None:
    """Refuse inputs whose token layout differs from the plan's (PlanMismatchError naming the setting).

    ``inputs`` may be padded (``pad_query``) or not: a question of up to the plan's
    video.max_question_tokens fits. Position ids are compared with the plan's segment bounds
    when the clip's timing is the plan's (Qwen2.5-VL's temporal ids follow the clip's real
    sampling rate, a runtime value the plan's sizes do not depend on)."""
    lay = plan.layout
    grid = tuple(int(x) for x in inputs.video_grid_thw[0])
    merge = plan.video.spatial_merge
    got_grid = (grid[0], grid[1] // merge, grid[2] // merge)
    if got_grid != tuple(lay.grid_thw):
        h, w = inputs.frame_size
        want_h, want_w = lay.frame_size
        raise PlanMismatchError(
            f"the video gives {got_grid[0]} temporal grids of {h}x{w} pixels but the plan expects {lay.grid_thw[0]} "
            f"of {want_h}x{want_w}; re-plan with frames= and video.resolution= of this video {REPLAN_HINT}",
            setting="video.resolution")
    system = plan.video.system_tokens
    if inputs.video_start != system:
        raise PlanMismatchError(f"the prompt has {inputs.video_start} tokens before the video but the plan has "
                                f"{system}; re-plan with video.system_tokens={inputs.video_start} {REPLAN_HINT}",
                                setting="video.system_tokens")
    context = inputs.context_tokens
    query = inputs.prompt_tokens - context
    if context != lay.context_tokens:
        raise PlanMismatchError(f"the prompt's context has {context} tokens but the plan's has {lay.context_tokens}; "
                                f"re-plan for this input {REPLAN_HINT}", setting="video")
    if query > lay.query_tokens:
        q_now = query - suffix_tokens(plan)
        raise PlanMismatchError(
            f"the question takes {q_now} tokens but the plan holds at most {plan.video.max_question_tokens}; shorten it or "
            f"re-plan with video.max_question_tokens={q_now} {REPLAN_HINT}", setting="video.max_question_tokens")
    if query <= suffix_tokens(plan):
        raise InputError("the prompt has no question tokens after the video", setting="question")
    if not _same_timing(plan, inputs):
        return
    inputs, positions = pad_query(plan, inputs, positions)
    for seg in lay.segments:
        span = positions[:, seg.start:seg.stop]
        lo = tuple(int(x) for x in span.min(dim=1).values)
        hi = tuple(int(x) for x in span.max(dim=1).values)
        if lo != tuple(seg.pos_min) or hi != tuple(seg.pos_max):
            raise PlanMismatchError(
                f"segment {seg.name} has position ids {lo}..{hi} but the plan has {tuple(seg.pos_min)}.."
                f"{tuple(seg.pos_max)}; re-plan {REPLAN_HINT}",
                setting="video.fps")


def _same_timing(plan: Plan, inputs: ModelInputs) -> bool:
    """Whether the input's seconds per temporal grid is the one the plan assumed (video.fps)."""
    if inputs.second_per_grid_ts is None:
        return True
    planned = float(plan.video.temporal_patch) / float(plan.video.fps)
    return abs(float(inputs.second_per_grid_ts.reshape(-1)[0]) - planned) <= 1e-6 * max(1.0, planned)


def observed_settings(inputs: ModelInputs, plan: Plan, source_size: tuple[int, int], frames: int) -> dict[str, Any]:
    """Config settings (dotted keys) that describe this input, for re-planning (the entry point uses them).
    The question capacity only grows: a re-planned plan still holds the plan's questions."""
    context = inputs.context_tokens
    question = inputs.prompt_tokens - context - suffix_tokens(plan)
    return {"video.frames": int(frames), "video.resolution": f"{source_size[0]}x{source_size[1]}",
            "video.system_tokens": int(inputs.video_start),
            "video.max_question_tokens": max(1, question, plan.video.max_question_tokens)}


# -- per-rank slicing ---------------------------------------------------------------------------
def local_indices(rank_plan: RankPlan, device: torch.device | str | None = None) -> torch.Tensor:
    """Global token index of every row of the rank's local sequence, in local order."""
    return torch.cat([torch.arange(a, b, device=device) for a, b in rank_plan.local])


def local_embeddings(embed_tokens: torch.nn.Module, inputs: ModelInputs, video_embeds: torch.Tensor,
                     index: torch.Tensor) -> torch.Tensor:
    """Embeddings of the local rows only: token embeddings with the video rows replaced by the
    rank's local visual embeddings (``video_embeds``: its video tokens in local order, as the
    frame-parallel encoder returns them): the model's masked_scatter, restricted to this rank."""
    ids = inputs.input_ids[0].to(index.device)[index]
    emb = embed_tokens(ids)
    is_video = ids == inputs.video_token_id
    if int(is_video.sum()) != video_embeds.shape[0]:
        raise PlanMismatchError(f"this rank's local sequence holds {int(is_video.sum())} video tokens but the vision "
                                f"encoder delivered {video_embeds.shape[0]}; re-plan for this input {REPLAN_HINT}",
                                setting="video")
    emb[is_video] = video_embeds.to(emb.dtype)
    return emb


def slice_positions(positions: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(3, N) global ids -> (3, 1, n_local) for the language model."""
    return positions[:, index.to(positions.device)].unsqueeze(1)


__all__: Sequence[str] = ("Processing", "ModelInputs", "load_processing", "default_processing", "fast_processors_available",
                          "processing_device", "video_pixels", "build_inputs",
                          "synthetic_inputs", "global_position_ids", "pad_query", "check_against_plan", "observed_settings",
                          "local_indices", "local_embeddings", "slice_positions")
