"""The model inputs every family builds (runtime/hf/inputs.py: Qwen2-VL / Qwen2.5-VL;
runtime/hf/internvl_inputs.py: InternVL3): the checkpoint's processing parts, the built prompt with
its video, and the prompt pieces both builders share (chat template call, question check)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from spava_plan.errors import InputError


@dataclass
class Processing:
    """The checkpoint's processing parts."""

    tokenizer: Any
    image_processor: Any  # used for frames when no video processor can be built
    video_processor: Any | None
    chat_template: str | None
    source: str  # "processor" (AutoProcessor), "parts" (tokenizer + image processor) or "default"
    # Where the processor runs (transformers' fast processors' ``device=``): "cuda" when the run is
    # on a GPU, "cpu" otherwise; its pixels come back on this device.
    device: str = "cpu"


@dataclass
class ModelInputs:
    input_ids: torch.Tensor  # (1, N) long
    mm_token_type_ids: torch.Tensor  # (1, N) int: 0 text, 2 video
    pixel_values_videos: torch.Tensor  # (T*h*w patches, C*tp*ps*ps) float32
    video_grid_thw: torch.Tensor  # (1, 3) long, in patches (merged tokens = t*h*w / merge^2)
    second_per_grid_ts: torch.Tensor | None  # (1,) Qwen2.5-VL: seconds per temporal grid
    video_token_id: int
    frame_size: tuple[int, int]  # (height, width) after the processor's resize
    # Query padding appended by ``pad_query`` (the last ``pad_tokens`` rows are not part of the
    # prompt): a question shorter than the plan's capacity runs on the plan's full layout.
    pad_tokens: int = 0
    # InternVL3: the video is frame text and tiles ("Frame{i}: <img>...</img>\n"): its global span
    # [start, stop) including the text, and no <|vision_end|> after it. None: the video is the run
    # of video tokens (Qwen), closed by one <|vision_end|>.
    video_span: tuple[int, int] | None = None
    end_tokens: int = 1  # tokens after the video that still belong to the context
    # The temporal grids [g0, g1) whose pixels ``pixel_values_videos`` holds; None: all of them.
    # Single-rank mode holds only its rank's grids (a 32768-frame video's whole pixel tensor is
    # hundreds of GB of host memory, even when allocated and never touched).
    pixel_grids: tuple[int, int] | None = None

    @property
    def total_tokens(self) -> int:
        """Rows of the (padded) sequence the ranks run."""
        return int(self.input_ids.shape[1])

    @property
    def prompt_tokens(self) -> int:
        """Real prompt tokens (without the query padding)."""
        return self.total_tokens - self.pad_tokens

    @property
    def video_mask(self) -> torch.Tensor:
        return self.input_ids[0] == self.video_token_id

    @property
    def video_start(self) -> int:
        if self.video_span is not None:
            return self.video_span[0]
        return int(torch.nonzero(self.video_mask)[0, 0])

    @property
    def video_tokens(self) -> int:
        """Tokens of the video in the prompt (InternVL3: with the frames' text)."""
        if self.video_span is not None:
            return self.video_span[1] - self.video_span[0]
        return int(self.video_mask.sum())

    @property
    def context_tokens(self) -> int:
        return self.video_start + self.video_tokens + self.end_tokens


def chat_prompt(processing: Processing, question: str, fallback: str) -> str:
    """One user turn [video, question] through the checkpoint's chat template, with the generation
    prompt; ``fallback`` (a ``{question}`` format string) when the checkpoint has no template. Each
    family checks where the template put its video placeholder."""
    if processing.chat_template is None:
        return fallback.format(question=question)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    return processing.tokenizer.apply_chat_template(messages, chat_template=processing.chat_template,
                                                    tokenize=False, add_generation_prompt=True)


def check_question(question: str, markers: Sequence[str]) -> None:
    """A non-empty question holding none of the family's special tokens (``markers``)."""
    if not isinstance(question, str) or not question.strip():
        raise InputError("the question is empty; pass question=\"...\"", setting="question")
    for marker in markers:
        if marker in question:
            raise InputError(f"the question contains the special token {marker}, which would break the prompt "
                             f"layout", setting="question")
