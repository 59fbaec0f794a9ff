"""Who sends which visual embeddings to whom after the frame-parallel vision encoder.

SPAVA_SPEC.md section 2 encodes contiguous temporal grids per rank and then all-gathers every
embedding to every rank. A rank only needs the video tokens of its own local sequence
(``RankPlan.local``: anchor | its blocks | query), so the runtime exchanges exactly those:

- rows that EVERY rank holds (spava/apb: the anchor's video tokens; star: block 0's) go by
  broadcast, one per encoding rank that holds some (``shared``). Through an all-to-all they would
  sit W times in the sender's input buffer (rank 0 at 1024 GPUs, 131072 frames: 525 GiB) and W
  times through its link;
- every other needed row goes through ONE ``all_to_all_single`` with uneven splits: rank s sends
  rank d the rows of s's grids that lie in d's local sequence, ascending (``sends`` / ``recvs``).

With vision.parallel=one_gpu rank 0 encodes every grid and the other ranks none (``grid_ranges``
with one encoder): the same two steps then scatter each rank its rows from rank 0.

Every size is a static function of the plan, shared here by the planner (memory, cost) and the
runtime (the collectives), so the two cannot disagree. Each rank ends with its local video rows in
local order. Pure Python, no torch.

Notation: a "span" is a global token range [start, stop); a "piece" is (rank, start, stop): the
rank is the source (in ``shared`` and ``recvs``) or the destination (in ``sends``). Grid g covers
the video tokens [video_start + g*tpg, video_start + (g+1)*tpg), tpg = tokens per grid.
InternVL3: a frame's text tokens ("Frame{i}: <img>" ... "</img>\n") lie between its tiles' rows, so
the exchange is planned in embedding-row space (row f*256 + j is tile f's token j): each rank's
local spans are mapped to the rows of the image tokens they hold (``frame_tile_spans``).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Sequence

Span = tuple[int, int]
Piece = tuple[int, int, int]


def grid_ranges(grids: int, world: int, encoders: int | None = None) -> list[Span]:
    """Rank r encodes temporal grids [start, stop): over the first ``encoders`` ranks (default: all
    W), grids // encoders each, one more for the first grids % encoders; the ranks after them encode
    nothing (vision.parallel=one_gpu: encoders=1, rank 0 encodes the whole video)."""
    encoders = world if encoders is None else encoders
    base, extra = divmod(grids, encoders)
    out, pos = [], 0
    for r in range(world):
        n = base + (1 if r < extra else 0) if r < encoders else 0
        out.append((pos, pos + n))
        pos += n
    return out


def vision_encoders(world: int, parallel: str) -> int:
    """Ranks that run the vision tower: every rank (``frames``) or rank 0 alone (``one_gpu``)."""
    return 1 if parallel == "one_gpu" else world


def plan_encoders(world: int, parallel: str, method: str) -> int:
    """The encoders of a plan's exchange. dense_tp: one, since every rank encodes every grid with its
    shard of the tower and hands no rows on; its exchange (which its runtime never runs) is written as
    rank 0 holding them all, so a video of fewer grids than ranks is no error there."""
    return 1 if method == "dense_tp" else vision_encoders(world, parallel)


# -- InternVL3 frame text -------------------------------------------------------------------------
# The processor writes each frame as "Frame{i}: <img>" + tile_tokens x <IMG_CONTEXT> + "</img>" and
# joins frames with "\n"; the chat template's "<video>\n" adds the last frame's "\n". With a Qwen2
# tokenizer that is "Frame", one token per digit of i (numbers are split into digits), ":", " ",
# "<img>" before the tile and "</img>", "\n" after it: ``frame_text_tokens`` (6) counts every text
# token of a frame except the digits.
FRAME_SUFFIX_TOKENS = 2  # "</img>", "\n"


def frame_digits(i: int) -> int:
    """Tokens of the frame number i (1-based) in "Frame{i}: ": one per decimal digit."""
    return len(str(i))


def frame_video_tokens(frames: int, tile_tokens: int, frame_text_tokens: int) -> int:
    """All tokens of InternVL3's video prompt for ``frames`` frames (text and tiles)."""
    digits = sum(d * (min(frames, 10 ** d - 1) - 10 ** (d - 1) + 1) for d in range(1, len(str(frames)) + 1))
    return frames * (tile_tokens + frame_text_tokens) + digits


def frame_tile_spans(video_start: int, frames: int, tile_tokens: int, frame_text_tokens: int) -> list[Span]:
    """Global token span of each frame's tile (its <IMG_CONTEXT> tokens), frames in order."""
    prefix = frame_text_tokens - FRAME_SUFFIX_TOKENS
    spans, pos = [], video_start
    for i in range(1, frames + 1):
        a = pos + prefix + frame_digits(i)
        spans.append((a, a + tile_tokens))
        pos = a + tile_tokens + FRAME_SUFFIX_TOKENS
    return spans


def _rows_before(tiles: Sequence[Span], starts: list[int], token: int) -> int:
    """Image tokens (embedding rows) at global tokens < ``token``; tiles are equal-sized."""
    f = bisect.bisect_right(starts, token) - 1
    if f < 0:
        return 0
    a, b = tiles[f]
    return f * (b - a) + min(token, b) - a


def _to_rows(spans: Sequence[Span], tiles: Sequence[Span]) -> list[Span]:
    """Global token spans -> the embedding-row spans of the image tokens they hold (same order)."""
    starts = [a for a, _ in tiles]
    out = []
    for a, b in spans:
        lo, hi = _rows_before(tiles, starts, a), _rows_before(tiles, starts, b)
        if lo < hi:
            out.append((lo, hi))
    return out


def _clip(spans: Sequence[Span], lo: int, hi: int) -> list[Span]:
    """The parts of ``spans`` inside [lo, hi), in the given order."""
    return [(max(a, lo), min(b, hi)) for a, b in spans if max(a, lo) < min(b, hi)]


def _intersect(xs: list[Span], ys: list[Span]) -> list[Span]:
    """Intersection of two sorted lists of disjoint spans."""
    out, i, j = [], 0, 0
    while i < len(xs) and j < len(ys):
        a, b = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        if a < b:
            out.append((a, b))
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return out


def _subtract(span: Span, holes: list[Span]) -> list[Span]:
    """``span`` minus sorted disjoint ``holes``, ascending."""
    out, pos = [], span[0]
    for a, b in _clip(holes, *span):
        if pos < a:
            out.append((pos, a))
        pos = b
    if pos < span[1]:
        out.append((pos, span[1]))
    return out


@dataclass(frozen=True)
class VisionExchange:
    world: int
    video: Span  # global tokens of the video
    tokens_per_grid: int
    grids: tuple[Span, ...]  # per rank: the temporal grids it encodes
    local: tuple[tuple[Span, ...], ...]  # per rank: its local video spans, in local order
    shared: tuple[Piece, ...]  # (src, start, stop) broadcast from src to all, in call order
    recvs: tuple[tuple[Piece, ...], ...]  # per rank d: (src, start, stop) in all-to-all output order
    sends: tuple[tuple[Piece, ...], ...]  # per rank s: (dst, start, stop) in all-to-all input order

    # -- rows --------------------------------------------------------------------------------------
    def span(self, rank: int) -> Span:
        """Global tokens whose embeddings ``rank`` encodes (its own rows, ascending)."""
        g0, g1 = self.grids[rank]
        s = self.video[0]
        return s + g0 * self.tokens_per_grid, s + g1 * self.tokens_per_grid

    def own_rows(self, rank: int) -> int:
        a, b = self.span(rank)
        return b - a

    def local_rows(self, rank: int) -> int:
        """Rows the rank ends with: its local video tokens."""
        return sum(b - a for a, b in self.local[rank])

    def local_offset(self, rank: int, token: int) -> int:
        """Row of global video token ``token`` in the rank's local video rows."""
        offset = 0
        for a, b in self.local[rank]:
            if a <= token < b:
                return offset + token - a
            offset += b - a
        raise KeyError(f"video token {token} is not in rank {rank}'s local sequence")

    def identity(self, rank: int) -> bool:
        """One rank whose local video rows are exactly its own encoded rows: nothing to exchange."""
        return self.world == 1 and self.local[rank] == (self.span(rank),)

    # -- the all-to-all ----------------------------------------------------------------------------
    def send_rows(self, rank: int) -> int:
        """Rows in the rank's all-to-all input (its own share included)."""
        return sum(b - a for _, a, b in self.sends[rank])

    def recv_rows(self, rank: int) -> int:
        """Rows in the rank's all-to-all output."""
        return sum(b - a for _, a, b in self.recvs[rank])

    def send_splits(self, rank: int) -> list[int]:
        """Rows ``rank`` sends to each rank (all_to_all_single's input split sizes)."""
        out = [0] * self.world
        for d, a, b in self.sends[rank]:
            out[d] += b - a
        return out

    def recv_splits(self, rank: int) -> list[int]:
        """Rows ``rank`` receives from each rank (the output split sizes)."""
        out = [0] * self.world
        for s, a, b in self.recvs[rank]:
            out[s] += b - a
        return out

    def in_place(self, rank: int) -> bool:
        """The all-to-all output lands, in order, on one contiguous run of the local rows (so it is
        received straight into them): true for every plan the planner makes (local spans ascend and
        the shared rows come first); otherwise the runtime stages it and scatters."""
        pieces = self.recvs[rank]
        if not pieces:
            return True
        at = self.local_offset(rank, pieces[0][1])
        for _, a, b in pieces:
            if self.local_offset(rank, a) != at:
                return False
            at += b - a
        return True

    def busiest_rows(self) -> int:
        """Largest off-rank rows one rank sends or receives in the all-to-all (its link's load)."""
        sent = [sum(b - a for d, a, b in p if d != s) for s, p in enumerate(self.sends)]
        got = [sum(b - a for s, a, b in p if s != d) for d, p in enumerate(self.recvs)]
        return max(sent + got, default=0)


def vision_exchange(world: int, grids: int, tokens_per_grid: int, video_start: int,
                    locals_: Sequence[Sequence[Span]], tiles: Sequence[Span] | None = None,
                    encoders: int | None = None) -> VisionExchange:
    """The exchange for ``grids`` temporal grids of ``tokens_per_grid`` video tokens starting at
    global token ``video_start``, encoded by the first ``encoders`` of ``world`` ranks (default:
    all) whose local sequences are ``locals_``. With one encoder the same broadcasts and all-to-all
    are rank 0 scattering every rank its rows. With ``tiles`` (InternVL3: each grid's image-token
    span, text between them) the exchange is planned in embedding-row space: row g*tokens_per_grid
    + j is grid g's j-th image token."""
    if tiles is not None:
        assert len(tiles) == grids and all(b - a == tokens_per_grid for a, b in tiles), (grids, tokens_per_grid)
        locals_ = [_to_rows(spans, tiles) for spans in locals_]
        video_start = 0
    encoders = world if encoders is None else encoders
    assert len(locals_) == world and 1 <= encoders <= world and grids >= encoders, (len(locals_), world, grids)
    video = (video_start, video_start + grids * tokens_per_grid)
    ranges = grid_ranges(grids, world, encoders)
    starts = [video[0] + g0 * tokens_per_grid for g0, _ in ranges[:encoders]]  # first token of each encoder's rows

    def by_source(span: Span) -> list[Piece]:
        out, a = [], span[0]
        while a < span[1]:
            s = bisect.bisect_right(starts, a) - 1
            b = min(span[1], video[0] + ranges[s][1] * tokens_per_grid)
            out.append((s, a, b))
            a = b
        return out

    local = tuple(tuple(_clip(spans, *video)) for spans in locals_)
    shared = [video]
    for spans in local:  # tokens every rank holds
        shared = _intersect(shared, sorted(spans))
    recvs = []
    for d in range(world):
        pieces = [p for span in sorted(local[d]) for rest in _subtract(span, shared) for p in by_source(rest)]
        recvs.append(tuple(sorted(pieces)))  # all-to-all output: by source, then ascending
    sends: list[list[Piece]] = [[] for _ in range(world)]
    for d in range(world):
        for s, a, b in recvs[d]:
            sends[s].append((d, a, b))
    return VisionExchange(world=world, video=video, tokens_per_grid=tokens_per_grid, grids=tuple(ranges),
                          local=local, shared=tuple(p for span in shared for p in by_source(span)),
                          recvs=tuple(recvs), sends=tuple(tuple(p) for p in sends))


def plan_vision_exchange(plan: Any) -> VisionExchange:
    """The exchange of a Plan: its grids, its ranks' local sequences, and the video starting after
    the plan's ``video.system_tokens`` (as the runtime checks the prompt against the plan)."""
    lay = plan.layout
    grids = lay.grid_thw[0]
    start = plan.video.system_tokens
    tpg = lay.grid_thw[1] * lay.grid_thw[2]
    tiles = None
    if plan.model.family == "internvl3":
        tiles = frame_tile_spans(start, grids, tpg, plan.video.frame_text_tokens)
    return vision_exchange(plan.world_size, grids, tpg, start, [r.local for r in plan.ranks], tiles,
                           plan_encoders(plan.world_size, plan.vision_parallel, plan.method))
