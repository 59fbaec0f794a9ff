"""Model inputs for InternVL3: the prompt as transformers' InternVLProcessor writes it, one tile per frame.

The processor replaces the chat template's ``<video>`` with one line per frame,

    "Frame{i}: <img>" + tile_tokens x "<IMG_CONTEXT>" + "</img>"   (i from 1, lines joined by "\\n")

(``InternVLProcessor.replace_video_token``; tests/test_model_internvl.py checks ``video_text``
against it), and the template's "\\n" after ``<video>`` closes the last line. Every frame is resized
to one square tile (no cropping into several tiles for video), rescaled and normalised by
transformers' fast ``InternVLVideoProcessor`` on the run's device (``Processing.device``), or, on a
CPU machine without torchvision, by the image processor's PIL backend one frame at a time (the only
difference is the resize library, within two uint8 levels after normalisation). Positions are 1-D:
token i is at position i.

The planner's layout (planner/layout.py, spava_plan.vision_exchange.frame_video_tokens) counts
the same tokens; ``check_against_plan`` refuses a prompt whose counts differ.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from spava_plan.errors import InputError
from spava_plan.vision_exchange import frame_tile_spans, frame_video_tokens

from .model import internvl_special_ids
from .model_inputs import ModelInputs, Processing, chat_prompt, check_question

IMG_START, IMG_END, IMG_CONTEXT, VIDEO = "<img>", "</img>", "<IMG_CONTEXT>", "<video>"
SPECIAL_MARKERS = (IMG_START, IMG_END, IMG_CONTEXT, VIDEO, "<|im_start|>", "<|im_end|>", "<|endoftext|>")
# InternVL's chat layout, used only when a checkpoint ships no chat template.
FALLBACK_TEMPLATE_TEXT = "<|im_start|>user\n<video>\n{question}<|im_end|>\n<|im_start|>assistant\n"
# InternViT's normalisation (InternVL3-hf's preprocessor_config.json)
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def internvl_image_processor(tile_size: int, fast: bool = False) -> Any:
    """InternVL's image processor class (GotOcr2; ``fast``: the torchvision one) for one square tile per
    frame, InternViT's mean/std."""
    import transformers

    pil = getattr(transformers, "GotOcr2ImageProcessorPil", None)
    cls = transformers.GotOcr2ImageProcessor if fast or pil is None else pil
    return cls(size={"height": int(tile_size), "width": int(tile_size)}, crop_to_patches=False,
               image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)


def internvl_video_processor(tile_size: int) -> Any:
    """InternVL's fast video processor (needs torchvision) for one square tile per frame, InternViT's
    mean/std, frames as given (no sampling: the plan fixes them)."""
    import transformers

    return transformers.InternVLVideoProcessor(size={"height": int(tile_size), "width": int(tile_size)},
                                               image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
                                               do_sample_frames=False)


def video_text(frames: int, tile_tokens: int) -> str:
    """What InternVLProcessor puts in place of ``<video>`` for ``frames`` frames."""
    tile = IMG_CONTEXT * tile_tokens
    return "\n".join(f"Frame{i + 1}: {IMG_START}{tile}{IMG_END}" for i in range(frames))


def prompt_text(processing: Processing, question: str) -> str:
    """The chat prompt with one ``<video>`` placeholder and the generation prompt."""
    check_question(question, SPECIAL_MARKERS)
    text = chat_prompt(processing, question, FALLBACK_TEMPLATE_TEXT)
    if processing.chat_template is not None and (text.count(VIDEO) != 1 or VIDEO + "\n" not in text):
        raise InputError(f"the checkpoint's chat template does not place exactly one {VIDEO} followed by a newline "
                         f"for a video", setting="model.checkpoint")
    return text


def frame_pixels(processing: Processing, frames: np.ndarray, tile_size: int) -> torch.Tensor:
    """(F, 3, tile, tile) float32 on the processing device: every frame resized to one tile and normalised."""
    size = {"height": int(tile_size), "width": int(tile_size)}
    if processing.video_processor is not None:
        video = torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
        out = processing.video_processor(videos=[video], size=size, do_sample_frames=False, return_tensors="pt",
                                         device=processing.device)
        pixels = out["pixel_values_videos"][0]
    else:
        if processing.device.startswith("cuda"):
            raise InputError("preprocessing on the GPU needs transformers' fast video processor", setting="device")
        out = processing.image_processor(images=list(frames), size=size, crop_to_patches=False, return_tensors="pt")
        pixels = out["pixel_values"]
    if pixels.shape[0] != frames.shape[0]:
        raise InputError(f"the processor made {pixels.shape[0]} tiles of {frames.shape[0]} frames",
                         setting="model.checkpoint")
    return pixels.float().contiguous()


def _grid(frames: int, tile_tokens: int) -> torch.Tensor:
    """(1, 3) [frames, patch rows, patch cols]: pixel shuffle merges 2x2 patches into one token."""
    side = math.isqrt(tile_tokens)
    return torch.tensor([[frames, 2 * side, 2 * side]], dtype=torch.long)


def build_internvl_inputs(processing: Processing, frames: np.ndarray, question: str, *, tile_size: int,
                          tile_tokens: int, image_token_id: int | None = None) -> ModelInputs:
    """Prompt ids + pixels for one video and one question, as InternVLProcessor builds them."""
    pixels = frame_pixels(processing, frames, tile_size)
    f = int(frames.shape[0])
    prompt = prompt_text(processing, question)
    at = prompt.index(VIDEO)
    video = video_text(f, tile_tokens)
    text = prompt[:at] + video + prompt[at + len(VIDEO):]
    tok = processing.tokenizer
    enc = tok(text, return_tensors="pt", return_offsets_mapping=True)
    ids = enc["input_ids"].long()
    starts = [int(a) for a, _ in enc["offset_mapping"][0].tolist()]
    # The video is [its first character, the "\n" after its last </img>]: both ends must be token
    # boundaries, or the text around it would tokenize differently from the planner's count.
    c0, c1 = at, at + len(video) + 1
    if c0 not in starts or (c1 < len(text) and c1 not in starts):
        raise InputError("the chat template's text merges with the frames' text into one token",
                         setting="model.checkpoint")
    t0 = starts.index(c0)
    t1 = starts.index(c1) if c1 < len(text) else len(starts)
    vid = tok.convert_tokens_to_ids(IMG_CONTEXT) if image_token_id is None else int(image_token_id)
    if int((ids[0] == vid).sum()) != f * tile_tokens:
        raise InputError(f"the tokenizer does not map {IMG_CONTEXT} to the model's image token id {vid}",
                         setting="model.checkpoint")
    return ModelInputs(ids, torch.zeros_like(ids, dtype=torch.int32), pixels, _grid(f, tile_tokens), None, vid,
                       (int(tile_size), int(tile_size)), video_span=(t0, t1), end_tokens=0)


def synthetic_internvl_inputs(processing: Processing, frames: np.ndarray, *, hf_config: Any, system_tokens: int,
                              question_tokens: int, tile_size: int, tile_tokens: int, frame_text_tokens: int,
                              seed: int = 0) -> ModelInputs:
    """For a random-weight model with no tokenizer: InternVL3's layout with random text ids.

    [random system ids | per frame: random "Frame{i}: " ids, <img>, tile, </img>, "\\n" |
     random question ids | 5 suffix ids]
    """
    pixels = frame_pixels(processing, frames, tile_size)
    f = int(frames.shape[0])
    vocab = int(hf_config.text_config.vocab_size)
    special = internvl_special_ids(vocab)
    vid = int(hf_config.image_token_id)
    n_video = frame_video_tokens(f, tile_tokens, frame_text_tokens)
    total = system_tokens + n_video + question_tokens + 5
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, min(min(special.values()), vid), (total,), generator=gen)
    for a, b in frame_tile_spans(system_tokens, f, tile_tokens, frame_text_tokens):
        ids[a - 1], ids[a:b], ids[b] = special["start_image_token_id"], vid, special["end_image_token_id"]
    ids = ids.long().unsqueeze(0)
    return ModelInputs(ids, torch.zeros_like(ids, dtype=torch.int32), pixels, _grid(f, tile_tokens), None, vid,
                       (int(tile_size), int(tile_size)), video_span=(system_tokens, system_tokens + n_video),
                       end_tokens=0)
