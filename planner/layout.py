"""Frames -> tokens -> segments: exact token counts and position-id bounds.

The counts follow the models' own processors:
- Qwen2-VL / Qwen2.5-VL: each frame is resized so both sides are multiples of
  patch x merge (28), rounding to the nearest multiple, within [min_pixels, max_pixels] (with
  model.vision.cap_pixels_per_frame, max_pixels is also bounded by an even share of the video's
  pixel budget: ``frame_max_pixels``; the plan records the rule, runtime/hf/inputs.py passes it to
  the processor); frames are padded to a multiple of the temporal patch (2) by repeating the last
  one; every temporal grid gives (H/28)*(W/28) tokens.
- InternVL3: one 448x448 tile per frame, 256 tokens per tile, plus the frame's text tokens
  "Frame{i}: <img>...</img>\n" as the processor writes them (spava_plan.vision_exchange).

Prompt layout (SPAVA_SPEC.md section 1): [system + <|vision_start|> | video | <|vision_end|>] is
the context (L tokens), [question | <|im_end|>\n<|im_start|>assistant\n] is the query (Lq), sized
for video.max_question_tokens: a shorter question leaves pad tokens at the end of the query block,
which the runtime keeps out of every real row's attention (positions continue through them, so the
segments' position bounds hold for any question length).

Position ids follow transformers' ``get_rope_index`` for the Qwen2-VL family (3-D M-RoPE: text
tokens advance all three components by one; a video grid puts (t*interval, row, col) on top of the
running position, and the text after it continues at +max(rows, cols)). InternVL3 uses 1-D ids.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from spava_plan.config import ModelConfig, VideoConfig
from spava_plan.errors import ConfigError
from spava_plan.vision_exchange import frame_video_tokens

# "<|im_end|>", "\n", "<|im_start|>", "assistant", "\n" closing the user turn in the chat template.
ASSISTANT_SUFFIX_TOKENS = 5
VISION_END_TOKENS = 1  # <|vision_end|>


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The Qwen2-VL processor's resize: sides to multiples of ``factor`` within the pixel bounds."""
    if max(height, width) / min(height, width) > 200:
        raise ConfigError(f"aspect ratio {height}x{width} exceeds 200:1, which the processor refuses",
                          setting="video.resolution")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def frame_max_pixels(vision, frames: int) -> int:
    """The processor's upper pixel bound for one of ``frames`` frames: model.vision.max_pixels, or with
    model.vision.cap_pixels_per_frame also an even share of the video's pixel budget, as
    transformers' Qwen2VLVideoProcessor.resize computes it (frames before temporal padding)."""
    if not vision.cap_pixels_per_frame:
        return vision.max_pixels
    total = int(vision.max_video_tokens * vision.factor * vision.factor * 0.9)
    return max(min(vision.max_pixels, total * vision.temporal_patch // frames), int(vision.min_pixels * 1.05))


@dataclass(frozen=True)
class TokenLayout:
    """Token counts of one prompt, before it is cut into segments."""

    frames: int  # frames after padding to the temporal patch
    frame_size: tuple[int, int]  # (height, width) after resize (InternVL3: the tile)
    grid_thw: tuple[int, int, int]  # (temporal grids, merged rows, merged cols) in LLM tokens
    system_tokens: int
    video_tokens: int
    context_tokens: int  # L
    query_tokens: int  # Lq: capacity (max question tokens + the assistant suffix)
    time_interval: float  # temporal position step per grid (Qwen2.5-VL scales by time)
    family: str

    @property
    def total_tokens(self) -> int:
        return self.context_tokens + self.query_tokens

    @property
    def tokens_per_grid(self) -> int:
        return self.grid_thw[1] * self.grid_thw[2]

    # -- positions ------------------------------------------------------------------------------
    @property
    def video_start(self) -> int:
        return self.system_tokens

    @property
    def video_stop(self) -> int:
        return self.system_tokens + self.video_tokens

    def _after_video_position(self) -> int:
        """Position id of the first text token after the video (all three components)."""
        if self.family == "internvl3":
            return self.video_stop
        return self.system_tokens + max(self.grid_thw[1], self.grid_thw[2])

    def position(self, token: int) -> tuple[int, int, int]:
        """(t, h, w) position ids of one global token (equal components for 1-D RoPE)."""
        if self.family == "internvl3" or token < self.video_start:
            return (token, token, token)
        if token >= self.video_stop:
            p = self._after_video_position() + token - self.video_stop
            return (p, p, p)
        i = token - self.video_start
        rows, cols = self.grid_thw[1], self.grid_thw[2]
        t, rest = divmod(i, rows * cols)
        r, c = divmod(rest, cols)
        s = self.system_tokens
        return (s + int(t * self.time_interval), s + r, s + c)

    def position_bounds(self, start: int, stop: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """Inclusive (min, max) of each position component over tokens [start, stop), in O(1)."""
        assert 0 <= start < stop <= self.total_tokens, (start, stop)
        if self.family == "internvl3":
            return (start, start, start), (stop - 1, stop - 1, stop - 1)
        # Components are non-decreasing in the token index except h/w inside the video, so
        # collect the bounds of the text parts and of the video part separately.
        lo = [math.inf] * 3
        hi = [-math.inf] * 3  # bounds collected from the parts below

        def take(p: tuple[int, int, int]) -> None:
            for k in range(3):
                lo[k] = min(lo[k], p[k])
                hi[k] = max(hi[k], p[k])

        # text before / after the video: monotone, the end points suffice
        for a, b in ((start, min(stop, self.video_start)), (max(start, self.video_stop), stop)):
            if a < b:
                take(self.position(a))
                take(self.position(b - 1))
        a, b = max(start, self.video_start), min(stop, self.video_stop)
        if a < b:
            # t is monotone; rows and columns wrap inside each grid
            row_lo, row_hi, col_lo, col_hi = _grid_span_bounds(
                a - self.video_start, b - 1 - self.video_start, self.grid_thw[1], self.grid_thw[2])
            s = self.system_tokens
            take((self.position(a)[0], s + row_lo, s + col_lo))
            take((self.position(b - 1)[0], s + row_hi, s + col_hi))
        return (int(lo[0]), int(lo[1]), int(lo[2])), (int(hi[0]), int(hi[1]), int(hi[2]))


def _grid_span_bounds(i0: int, i1: int, rows: int, cols: int) -> tuple[int, int, int, int]:
    """Min/max row and column over video tokens i0..i1 (inclusive) of row-major rows x cols grids."""
    per = rows * cols
    g0, g1 = i0 // per, i1 // per
    r0, c0 = divmod(i0 % per, cols)
    r1, c1 = divmod(i1 % per, cols)
    if g0 == g1 and r0 == r1:
        return r0, r0, c0, c1
    if g0 == g1:  # rows r0..r1: row r0 reaches the last column, row r1 starts at column 0
        return r0, r1, 0, cols - 1
    # Crosses into the next grid: the first grid reaches its last row and column, the next
    # starts at row 0, column 0.
    return 0, rows - 1, 0, cols - 1


def token_layout(model: ModelConfig, video: VideoConfig) -> TokenLayout:
    """Exact token counts of the prompt for this model and video."""
    height, width = video.size
    vis = model.vision
    if model.family == "internvl3":
        frames = video.frames
        tile = vis.tile_size
        # "Frame{i}: <img>" tile "</img>\n" per frame, exactly as the processor writes it
        video_tokens = frame_video_tokens(frames, vis.tile_tokens, vis.frame_text_tokens)
        side = int(math.isqrt(vis.tile_tokens))
        grid = (frames, side, side)
        frame_size = (tile, tile)
        end_tokens = 0
        interval = 1.0
    else:
        factor = vis.factor
        h_bar, w_bar = smart_resize(height, width, factor, vis.min_pixels, frame_max_pixels(vis, video.frames))
        frames = -(-video.frames // vis.temporal_patch) * vis.temporal_patch
        grid = (frames // vis.temporal_patch, h_bar // factor, w_bar // factor)
        video_tokens = grid[0] * grid[1] * grid[2]
        frame_size = (h_bar, w_bar)
        end_tokens = VISION_END_TOKENS
        # Qwen2.5-VL spaces temporal ids by seconds: tokens_per_second * (temporal_patch / fps).
        interval = (model.tokens_per_second * vis.temporal_patch / video.fps
                    if model.family == "qwen2_5_vl" else 1.0)
    context = video.system_tokens + video_tokens + end_tokens
    query = video.max_question_tokens + ASSISTANT_SUFFIX_TOKENS  # the capacity: shorter questions are padded
    return TokenLayout(frames=frames, frame_size=frame_size, grid_thw=grid, system_tokens=video.system_tokens,
                       video_tokens=video_tokens, context_tokens=context, query_tokens=query,
                       time_interval=interval, family=model.family)


def paper_anchor(context_tokens: int) -> int:
    """a = 128 * ceil((L // 64) / 128) (SPAVA_SPEC.md section 3)."""
    return 128 * -(-(context_tokens // 64) // 128)


def paper_passing(context_tokens: int) -> int:
    """p = 128 * ceil((L // 128) / 128) (SPAVA_SPEC.md section 4)."""
    return 128 * -(-(context_tokens // 128) // 128)


def apb_passing(context_tokens: int) -> int:
    """APB's passing length: L // 64 rounded up to a multiple of 128."""
    return 128 * -(-(context_tokens // 64) // 128)


def balanced_split(start: int, stop: int, parts: int) -> list[tuple[int, int]]:
    """Cut [start, stop) into ``parts`` contiguous ranges whose lengths differ by at most one
    (the longer ones first), instead of leaving one short last block."""
    total = stop - start
    base, extra = divmod(total, parts)
    spans, pos = [], start
    for i in range(parts):
        n = base + (1 if i < extra else 0)
        spans.append((pos, pos + n))
        pos += n
    assert pos == stop
    return spans
