"""Token counts pinned to the published numbers (SPAVA_SPEC.md section 1)."""
import pytest

from spava_plan.config import ModelConfig, VideoConfig
from spava_plan.planner.layout import balanced_split, paper_anchor, paper_passing, smart_resize, token_layout

QWEN = ModelConfig()  # Qwen2-VL-7B dims, processor bounds 56*56 .. 16384*28*28


@pytest.mark.parametrize("resolution, size, per_grid", [
    ("360p", (364, 644), 299),
    ("720p", (728, 1288), 1196),
    ("1080p", (1092, 1932), 2691),
    ("1440p", (1428, 2548), 4641),
])
def test_tokens_per_temporal_grid(resolution, size, per_grid):
    t = token_layout(QWEN, VideoConfig(frames=2, resolution=resolution))
    assert t.frame_size == size
    assert t.tokens_per_grid == per_grid
    assert t.video_tokens == per_grid


def test_published_totals():
    assert token_layout(QWEN, VideoConfig(frames=256, resolution="360p")).video_tokens == 38_272
    assert token_layout(QWEN, VideoConfig(frames=64, resolution="1440p")).video_tokens == 148_512


def test_odd_frame_count_is_padded_to_the_temporal_patch():
    t = token_layout(QWEN, VideoConfig(frames=3, resolution="360p"))
    assert t.frames == 4 and t.grid_thw[0] == 2 and t.video_tokens == 2 * 299


def test_explicit_height_by_width_and_pixel_bounds():
    assert token_layout(QWEN, VideoConfig(frames=2, resolution="720x1280")).tokens_per_grid == 1196
    # tiny frames are scaled up to min_pixels, huge ones down to max_pixels
    h, w = smart_resize(10, 10, 28, 56 * 56, 28 * 28 * 16384)
    assert h * w >= 56 * 56 and h % 28 == 0 and w % 28 == 0
    h, w = smart_resize(8000, 8000, 28, 56 * 56, 28 * 28 * 1024)
    assert h * w <= 28 * 28 * 1024


def test_internvl3_counts_tiles():
    """"Frame{i}: <img>" tile "</img>\n": 6 text tokens per frame plus one per digit of i."""
    m = ModelConfig(name="internvl3_2b", family="internvl3")
    m.vision.frame_text_tokens = 6
    t = token_layout(m, VideoConfig(frames=10, resolution="1080p", system_tokens=15, max_question_tokens=32))
    assert t.video_tokens == 10 * (256 + 6) + 9 * 1 + 1 * 2
    assert t.context_tokens == 15 + t.video_tokens and t.query_tokens == 32 + 5


def test_paper_rules():
    L = 148_528
    assert paper_anchor(L) == 2432
    assert paper_passing(L) == 1280
    spans = balanced_split(10, 33, 4)
    assert [b - a for a, b in spans] == [6, 6, 6, 5] and spans[0][0] == 10 and spans[-1][1] == 33


def _brute_bounds(t, a, b):
    pos = [t.position(i) for i in range(a, b)]
    return tuple(min(p[k] for p in pos) for k in range(3)), tuple(max(p[k] for p in pos) for k in range(3))


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_position_bounds_match_brute_force(family):
    m = ModelConfig(family=family)
    t = token_layout(m, VideoConfig(frames=6, resolution="112x168", fps=1.0, system_tokens=5, max_question_tokens=4))
    n = t.total_tokens
    for a in range(0, n, 3):
        for b in range(a + 1, n + 1, 5):
            assert t.position_bounds(a, b) == _brute_bounds(t, a, b), (a, b)


def test_positions_follow_mrope_rules():
    t = token_layout(ModelConfig(family="qwen2_5_vl"), VideoConfig(frames=4, resolution="56x84", fps=1.0,
                                                                    system_tokens=3, max_question_tokens=2))
    rows, cols = t.grid_thw[1:]
    assert (rows, cols) == (2, 3)
    assert t.position(2) == (2, 2, 2)
    assert t.position(3) == (3, 3, 3)  # first video token: (t=0, row 0, col 0) on top of 3
    assert t.position(3 + rows * cols) == (3 + 4, 3, 3)  # 2 positions per second x 2 s per grid
    assert t.position(t.video_stop) == (3 + max(rows, cols),) * 3  # vision_end continues the text
