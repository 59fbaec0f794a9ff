"""Plan-independent Triton kernels and host code, shared by every plan's generated module.

The generated module (codegen/templates) holds only what a plan decides: its shapes as named
constants, one function per task structure and one kernel per fused launch. Those call the jit
helpers here (attend_segment, store_rows) and hand their launch kernel to attend(); selection
and the LSE merge depend on no plan value at all and live here whole.

Notation (the generated module's legend repeats it):
  M    query rows (tokens) of one attention task        n    keys of one KV segment
  Hq   query heads     Hkv  KV heads     G = Hq / Hkv   D    head dim
  m    packed query row = token * G + g: one program owns BLOCK_M packed rows, i.e. the G query
       heads of ONE KV head for about BLOCK_M / G tokens, so each K/V tile it loads serves all
       G heads (GQA without repeating K/V)
  off  n - M of a causal segment: row i sees key j iff j <= i + off (bottom-right aligned)
  qk_scale  softmax scale * log2(e): scores live in base 2 (exp2); lse is converted to natural
       log once, at the store
"""
import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634

# Candidate (BLOCK_M, BLOCK_N, num_warps, num_stages, TMA, GROUPED) the backend's tuner times per
# device; the chosen one is recorded in autotune.json beside this file. TMA=1 loads K/V tiles
# through tensor descriptors made on the device (Hopper's copy engine) instead of per-thread
# pointers; GROUPED=1 orders programs by (task, KV head) for L2 reuse (see schedule()).
# (BLOCK_M=128 with 4 warps spills the fp32 accumulator; 128x128 tiles fit 3 stages at most.)
ATTENTION_CONFIGS = (
    (128, 128, 8, 3, 1, 0), (128, 128, 8, 3, 1, 1), (128, 64, 8, 3, 0, 0), (128, 64, 8, 3, 0, 1),
    (64, 64, 4, 3, 0, 1),
)
DEFAULT_CONFIG = (128, 128, 8, 3, 1, 1)  # used on a GPU until tuned (16-bit inputs)
FP32_CONFIG = (64, 64, 4, 2, 0, 1)  # fp32 tiles are twice the bytes: 128x128x3 stages do not fit
INTERPRETER_CONFIG = (32, 32, 1, 1, 0, 1)  # TRITON_INTERPRET=1 (CPU): small tiles, few interpreted programs


# ---- attention: helpers the generated task functions call (inlined by triton) ------------------
@triton.jit
def _tiles(acc, m_i, l_i, q, limit, k_src, v_src, sk_t, sv_t, lo, hi, n, qk_scale,
           CAUSAL: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
           PRECISION: tl.constexpr, TMA: tl.constexpr):
    """Online softmax over keys [lo, hi) of one segment (lo is a multiple of BLOCK_N).

    MASKED=False is the hot loop: every row of the tile sees every key, so no mask at all.
    TMA: k_src / v_src are tensor descriptors (the copy engine fetches tiles, rows past n read as
    zero); otherwise plain pointers.
    """
    offs_n = tl.arange(0, BLOCK_N)
    if not TMA:
        offs_d = tl.arange(0, D)
        rows = (lo + offs_n).to(tl.int64)
        k_ptrs = k_src + rows[:, None] * sk_t + offs_d[None, :]
        v_ptrs = v_src + rows[:, None] * sv_t + offs_d[None, :]
    for start in range(lo, hi, BLOCK_N):
        start = tl.multiple_of(start, BLOCK_N)
        if TMA:
            k = k_src.load([start, 0])
        elif MASKED:
            k = tl.load(k_ptrs, mask=(start + offs_n < n)[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if MASKED:
            cols = start + offs_n
            visible = (cols < n)[None, :]
            if CAUSAL:
                visible = visible & (cols[None, :] <= limit[:, None])
            qk = tl.where(visible, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that sees nothing yet
            p = tl.math.exp2(qk - m_use[:, None])
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_use = m_new
            p = tl.math.exp2(qk * qk_scale - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if TMA:
            v = v_src.load([start, 0])
        elif MASKED:
            v = tl.load(v_ptrs, mask=(start + offs_n < n)[:, None], other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new
        if not TMA:
            k_ptrs += BLOCK_N * sk_t
            v_ptrs += BLOCK_N * sv_t
    return acc, m_i, l_i


@triton.jit
def attend_segment(acc, m_i, l_i, q, tok, t_lo, t_hi, M, k_ptr, v_ptr, sk_t, sv_t, n, qk_scale,
                   CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, PRECISION: tl.constexpr,
                   TMA: tl.constexpr):
    """One KV segment of a task: an unmasked run of whole tiles, then the few masked ones."""
    if CAUSAL:
        off = n - M
        free = ((t_lo + off + 1) // BLOCK_N) * BLOCK_N  # keys every row of this tile sees
        stop = tl.minimum(t_hi + off + 1, n)  # one past the last key any row sees
        limit = tok + off
    else:
        free = (n // BLOCK_N) * BLOCK_N
        stop = n
        limit = tok
    if TMA:
        k_src = tl.make_tensor_descriptor(k_ptr, shape=[n, D], strides=[sk_t, 1], block_shape=[BLOCK_N, D])
        v_src = tl.make_tensor_descriptor(v_ptr, shape=[n, D], strides=[sv_t, 1], block_shape=[BLOCK_N, D])
    else:
        k_src = k_ptr
        v_src = v_ptr
    acc, m_i, l_i = _tiles(acc, m_i, l_i, q, limit, k_src, v_src, sk_t, sv_t, 0, free, n, qk_scale,
                           CAUSAL=CAUSAL, MASKED=False, BLOCK_N=BLOCK_N, D=D, PRECISION=PRECISION, TMA=TMA)
    acc, m_i, l_i = _tiles(acc, m_i, l_i, q, limit, k_src, v_src, sk_t, sv_t, free, stop, n, qk_scale,
                           CAUSAL=CAUSAL, MASKED=True, BLOCK_N=BLOCK_N, D=D, PRECISION=PRECISION, TMA=TMA)
    return acc, m_i, l_i


@triton.jit
def store_rows(acc, m_i, l_i, offs_m, tok, head, M, o_ptr, so_t, so_h, lse_ptr, sl_t, sl_h,
               G: tl.constexpr, D: tl.constexpr, WRITE_LSE: tl.constexpr):
    """Normalise and store the rows; a row with no visible key gets out = 0, lse = -inf."""
    valid = offs_m < M * G
    empty = l_i == 0.0
    l_use = tl.where(empty, 1.0, l_i)
    out = acc / l_use[:, None]
    offs_d = tl.arange(0, D)
    o_ptrs = o_ptr + tok.to(tl.int64)[:, None] * so_t + head[:, None] * so_h + offs_d[None, :]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=valid[:, None])
    if WRITE_LSE:
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_use)) * 0.6931471805599453)
        tl.store(lse_ptr + tok.to(tl.int64) * sl_t + head * sl_h, lse, mask=valid)



# ---- attention: host side of one fused launch -----------------------------------------------
def _pointer(t):
    """Triton needs a real address even for an empty tensor, which no program reads."""
    return t if t.numel() > 0 else torch.empty(1, dtype=t.dtype, device=t.device)


def _flat_args(tasks, outs, lses):
    """Kernel arguments in the order the launch kernels declare them, and whether every K/V
    segment suits tensor descriptors (16-byte aligned base and row/head strides)."""
    args = []
    aligned = True
    for (q, segs, _), out, lse in zip(tasks, outs, lses):
        qs, os_, ls = q.stride(), out.stride(), lse.stride()
        args += [_pointer(q), qs[0], qs[1], _pointer(out), os_[0], os_[1], _pointer(lse), ls[0], ls[1], q.shape[0]]
        for k, v, _causal in segs:
            n = k.shape[0]
            ks, vs = k.stride(), v.stride()
            if n:
                size = k.element_size()
                aligned = aligned and not (k.data_ptr() % 16 or v.data_ptr() % 16 or (ks[0] * size) % 16
                                           or (ks[1] * size) % 16 or (vs[0] * size) % 16 or (vs[1] * size) % 16)
            else:
                k = v = _pointer(k)
            args += [k, v, n, ks[0], ks[1], vs[0], vs[1]]
    return args, aligned


_SCHEDULES = {}


def _visible_keys(m_last, M, segs, group):
    """Keys the last packed row of a tile sees: the tile's cost for the heaviest-first order."""
    tok = m_last // group
    return sum(n if not causal else min(n, tok + n - M + 1) for n, causal in segs)


def schedule(tasks, block_m, device, grouped=False, *, group, kv_heads):
    """(programs, 3) int32 table of (task, first packed row, KV head).

    grouped=False: heaviest tile first (longest-processing-time order). grouped=True: all tiles of
    one (task, KV head) together, heaviest first inside and groups by their heaviest tile, so the
    programs running at one time stream the same K/V (they fit in L2); the last programs are still
    the lightest tiles.
    """
    shape = tuple((q.shape[0], tuple((k.shape[0], c) for k, _, c in segs)) for q, segs, _ in tasks)
    key = (shape, block_m, str(device), grouped, group, kv_heads)  # shared by every loaded plan
    table = _SCHEDULES.get(key)
    if table is None:
        groups = []
        for t, (M, segs) in enumerate(shape):
            tiles = [(_visible_keys(min(m0 + block_m, M * group) - 1, M, segs, group), m0)
                     for m0 in range(0, M * group, block_m)]
            tiles.sort(key=lambda x: (-x[0], x[1]))
            groups += [[(cost, t, m0, h) for cost, m0 in tiles] for h in range(kv_heads) if tiles]
        if grouped:
            groups.sort(key=lambda g: (-g[0][0], g[0][1], g[0][3]))
            items = [x for g in groups for x in g]
        else:
            items = sorted((x for g in groups for x in g), key=lambda x: (-x[0], x[1], x[2], x[3]))
        flat = [v for _, t, m0, h in items for v in (t, m0, h)]
        table = torch.tensor(flat, dtype=torch.int32).reshape(-1, 3).to(device)
        if len(_SCHEDULES) > 256:
            _SCHEDULES.clear()
        _SCHEDULES[key] = table
    return table


def _alloc(size, alignment, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def attend(kernel, tasks, scale, config, *, group, head_dim, kv_heads, write_lse=True):
    """One fused launch of a generated launch kernel; group, head_dim, kv_heads: the plan's G, D, Hkv.

    tasks: [(q (M,Hq,D), [(k (n,Hkv,D), v (n,Hkv,D), causal)], out or None)].

    Returns [(out, lse)]. Views with any token/head strides are read in place (D contiguous).
    Outputs not given are views of one buffer; lse of all tasks share one fp32 buffer.
    """
    block_m, block_n, num_warps, num_stages, tma, grouped = config
    q0 = tasks[0][0]
    rows = [q.shape[0] for q, _, _ in tasks]
    lse_all = torch.empty((sum(rows), q0.shape[1]), dtype=torch.float32, device=q0.device)
    lses = lse_all.split(rows)
    missing = [i for i, (_, _, o) in enumerate(tasks) if o is None]
    fresh = iter(torch.empty((sum(rows[i] for i in missing),) + tuple(q0.shape[1:]), dtype=q0.dtype,
                             device=q0.device).split([rows[i] for i in missing])) if missing else iter(())
    outs = [o if o is not None else next(fresh) for _, _, o in tasks]
    args, aligned = _flat_args(tasks, outs, lses)
    tma = bool(tma) and aligned
    if tma:
        triton.set_allocator(_alloc)  # device-made descriptors live in a global scratch buffer
    table = schedule(tasks, block_m, q0.device, bool(grouped), group=group, kv_heads=kv_heads)
    if table.shape[0] > 0:
        precision = "ieee" if q0.dtype == torch.float32 else "tf32"
        kernel[(table.shape[0],)](table, scale * LOG2E, *args, G=group, D=head_dim, BLOCK_M=block_m,
                                  BLOCK_N=block_n, WRITE_LSE=write_lse, PRECISION=precision, TMA=tma,
                                  num_warps=num_warps, num_stages=num_stages)
    return list(zip(outs, lses))


# ---- selection: fused score (query-mean GEMV) + max-pool, then top-k and a packed gather -------
@triton.jit
def _select_keys(q_ptr, sq_t, sq_h, Lq, k_ptr, sk_t, sk_h, n, key_ptr,
                 G: tl.constexpr, D: tl.constexpr, POOL: tl.constexpr, NORM: tl.constexpr,
                 BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr):
    """Pooled score of BLOCK_J keys of one KV head, written as an int32 in the score's order.

    score[j] = <k[j], qbar> with qbar the mean of the query over its Lq rows and G heads (fp32):
    mean_t <k, q_t> = <k, mean_t q_t>, so one GEMV replaces Lq dot products. NORM: ||k[j]||.
    Max-pool (window POOL, stride 1, -inf outside the block) recomputes the POOL//2 halo keys so
    that programs stay independent.
    """
    _select_keys_body(q_ptr, sq_t, sq_h, Lq, k_ptr, sk_t, sk_h, n, key_ptr, G, D, POOL, NORM, BLOCK_J, BLOCK_R)


@triton.jit
def _select_keys_body(q_ptr, sq_t, sq_h, Lq, k_ptr, sk_t, sk_h, n, key_ptr,
                      G: tl.constexpr, D: tl.constexpr, POOL: tl.constexpr, NORM: tl.constexpr,
                      BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr):
    """_select_keys' work for program (key tile program_id(0), KV head program_id(1))."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    offs_d = tl.arange(0, D)
    qbar = tl.zeros([D], dtype=tl.float32)
    if not NORM:
        for r0 in range(0, Lq * G, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            ptrs = q_ptr + (rows // G)[:, None] * sq_t + (h * G + rows % G)[:, None] * sq_h + offs_d[None, :]
            x = tl.load(ptrs, mask=(rows < Lq * G)[:, None], other=0.0).to(tl.float32)
            qbar += tl.sum(x, 0)
        qbar = qbar / (Lq * G)
    j = pid * BLOCK_J + tl.arange(0, BLOCK_J)
    pooled = tl.full([BLOCK_J], float("-inf"), dtype=tl.float32)
    for s in range(POOL):  # a loop, not unrolled: one (BLOCK_J, D) tile live at a time
        js = j + (s - POOL // 2)
        ok = (js >= 0) & (js < n)
        kk = tl.load(k_ptr + h * sk_h + js.to(tl.int64)[:, None] * sk_t + offs_d[None, :], mask=ok[:, None],
                     other=0.0).to(tl.float32)
        if NORM:
            sc = tl.sqrt(tl.sum(kk * kk, 1))
        else:
            sc = tl.sum(kk * qbar[None, :], 1)
        pooled = tl.maximum(pooled, tl.where(ok, sc, float("-inf")))
    pooled = pooled + 0.0  # -0.0 -> +0.0 so equal scores get equal keys
    bits = pooled.to(tl.int32, bitcast=True)
    tl.store(key_ptr + h * n + j, bits ^ ((bits >> 31) & 0x7FFFFFFF), mask=j < n)  # float order == int order


@triton.jit
def _select_top(key_ptr, n, keep, idx_ptr, BLOCK: tl.constexpr):
    """One program per KV head: the keep largest keys, as token indices in ascending order.

    All n keys stay in registers (BLOCK >= n). A 32-step bisection over the int32 range finds T,
    the keep-th largest key: count(key >= T) >= keep > count(key > T) (each step one compare per
    key and one block reduction; a radix histogram was slower: its bins contend). Every key > T is
    taken and, of the keys == T, the earliest ones (ties go to the earlier token); a prefix sum
    over the chosen flags gives each chosen index its slot, so the output is already in token
    order (no sort).
    """
    _select_top_body(key_ptr, n, keep, idx_ptr, BLOCK)


@triton.jit
def _select_top_body(key_ptr, n, keep, idx_ptr, BLOCK: tl.constexpr):
    """_select_top's work for KV head program_id(0)."""
    h = tl.program_id(0)
    j = tl.arange(0, BLOCK)
    inside = j < n
    key = tl.load(key_ptr + h * n + j, mask=inside, other=-2147483648)
    lo = tl.full([], -2147483648, tl.int64)  # count(key >= lo) = n >= keep
    hi = tl.full([], 2147483648, tl.int64)  # count(key >= hi) = 0 < keep
    for _ in range(32):
        mid = (lo + hi) >> 1  # lo < mid < hi <= 2^31, so it fits int32
        enough = tl.sum(((key >= mid.to(tl.int32)) & inside).to(tl.int32), 0) >= keep
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid)
    t = lo.to(tl.int32)
    above = (key > t) & inside
    tie = (key == t) & inside
    take_ties = keep - tl.sum(above.to(tl.int32), 0)
    chosen = above | (tie & (tl.cumsum(tie.to(tl.int32), 0) <= take_ties))
    slot = tl.cumsum(chosen.to(tl.int32), 0) - 1
    tl.store(idx_ptr + h * keep + slot, j, mask=chosen)


@triton.jit
def _gather_kv(idx_ptr, keep, k_ptr, sk_t, sk_h, v_ptr, sv_t, sv_h, out_ptr, so_t, so_h,
               D: tl.constexpr, BLOCK_R: tl.constexpr):
    """out[r, h] = k[idx[h, r], h] | v[idx[h, r], h]: the packed (keep, Hkv, 2D) send buffer."""
    _gather_kv_body(idx_ptr, keep, k_ptr, sk_t, sk_h, v_ptr, sv_t, sv_h, out_ptr, so_t, so_h, D, BLOCK_R)


@triton.jit
def _gather_kv_body(idx_ptr, keep, k_ptr, sk_t, sk_h, v_ptr, sv_t, sv_h, out_ptr, so_t, so_h,
                    D: tl.constexpr, BLOCK_R: tl.constexpr):
    """_gather_kv's work for program (row tile program_id(0), KV head program_id(1))."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    h = tl.program_id(1)
    ok = r < keep
    j = tl.load(idx_ptr + h * keep + r, mask=ok, other=0).to(tl.int64)
    offs_d = tl.arange(0, D)
    k = tl.load(k_ptr + h * sk_h + j[:, None] * sk_t + offs_d[None, :], mask=ok[:, None])
    v = tl.load(v_ptr + h * sv_h + j[:, None] * sv_t + offs_d[None, :], mask=ok[:, None])
    o_ptrs = out_ptr + h * so_h + r.to(tl.int64)[:, None] * so_t + offs_d[None, :]
    tl.store(o_ptrs, k.to(out_ptr.dtype.element_ty), mask=ok[:, None])
    tl.store(o_ptrs + D, v.to(out_ptr.dtype.element_ty), mask=ok[:, None])


_ARANGE = {}


MAX_TOP_BLOCK = 16384  # _select_top keeps a whole block's keys in registers up to this many tokens


def _keys_buffer(shape, device):
    """int32 room for the pooled-score keys of one call, from the caching allocator (stream-ordered:
    no host sync). Not one shared buffer per shape: an emulated world's rank threads select blocks
    of the same size at the same time on one device, and one rank's top-k could read another's keys."""
    return torch.empty(shape, dtype=torch.int32, device=device)


def select_indices(q_query, k, keep, pool_window, score):
    """(Hkv, keep) int32 token indices into the block, ascending per head (ties: earlier token)."""
    n, hkv, d = k.shape
    if keep == n:  # every token, in order: no scoring
        key = (n, hkv, str(k.device))
        if key not in _ARANGE:
            _ARANGE[key] = torch.arange(n, dtype=torch.int32, device=k.device).repeat(hkv, 1)
        return _ARANGE[key]
    keys = _keys_buffer((hkv, n), k.device)
    block_j = 64 if k.is_cuda else 32  # 64 x D fp32 tiles: no register spills at 4 warps
    _select_keys[(triton.cdiv(n, block_j), hkv)](
        q_query, q_query.stride(0), q_query.stride(1), q_query.shape[0], k, k.stride(0), k.stride(1), n, keys,
        G=q_query.shape[1] // hkv, D=d, POOL=pool_window, NORM=(score == "key_norm"), BLOCK_J=block_j,
        BLOCK_R=32, num_warps=4)
    block = triton.next_power_of_2(n)
    if block <= MAX_TOP_BLOCK:
        idx = torch.empty((hkv, keep), dtype=torch.int32, device=k.device)
        _select_top[(hkv,)](keys, n, keep, idx, BLOCK=block, num_warps=16 if block >= 8192 else 4)
        return idx
    # very long blocks: top-k on (key << 32 | (2^32 - 1 - j)) keeps the earlier-token tie rule
    order = (keys.to(torch.int64) << 32) | (4294967295 - torch.arange(n, device=k.device, dtype=torch.int64))
    top = torch.topk(order, keep, dim=1, sorted=False).values
    return torch.sort((4294967295 - (top & 4294967295)).to(torch.int32), dim=1).values


def gather(idx, k, v, out=None):
    """Packed (keep, Hkv, 2D) K|V rows idx[h] of every KV head (the all-gather send buffer)."""
    hkv, keep = idx.shape
    d = k.shape[2]
    if out is None:
        out = torch.empty((keep, hkv, 2 * d), dtype=k.dtype, device=k.device)
    if keep > 0:
        block_r = 64 if k.is_cuda else 32
        _gather_kv[(triton.cdiv(keep, block_r), hkv)](idx, keep, k, k.stride(0), k.stride(1), v, v.stride(0),
                                                      v.stride(1), out, out.stride(0), out.stride(1), D=d,
                                                      BLOCK_R=block_r, num_warps=4)
    return out


def select(q_query, k, v, keep, pool_window, score, out=None):
    """Top ``keep`` keys per KV head of one block, packed as (keep, Hkv, 2D) in token order."""
    if keep == 0:
        return torch.empty((0, k.shape[1], 2 * k.shape[2]), dtype=k.dtype, device=k.device) if out is None else out
    return gather(select_indices(q_query, k, keep, pool_window, score), k, v, out)


# ---- selection of several blocks in one launch per step -----------------------------------------
# A rank selects from each of its passing blocks (2 per rank with ZigZag pairs) every layer. The
# top-k runs one program per KV head (2 at Qwen2.5-VL-3B), so one block's launch is latency-bound
# on 2 CTAs: the blocks' programs go into ONE launch of each step instead (program axis b = block),
# each program doing exactly the single-block kernel's work on its block (same results, bit for
# bit). Blocks are row ranges [lo, lo + n) of one K/V; BLOCKS holds (lo, n, keep, key offset,
# index offset) per block (int64) and every block shares the grid of the largest.
@triton.jit
def _select_keys_blocks(q_ptr, sq_t, sq_h, Lq, k_ptr, sk_t, sk_h, blocks_ptr, key_ptr,
                        G: tl.constexpr, D: tl.constexpr, POOL: tl.constexpr, NORM: tl.constexpr,
                        BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr):
    """_select_keys on block program_id(2): its keys k[lo:lo+n] into key_ptr[key offset:]."""
    b = tl.program_id(2)
    lo = tl.load(blocks_ptr + b * 5)
    n = tl.load(blocks_ptr + b * 5 + 1)
    key_off = tl.load(blocks_ptr + b * 5 + 3)
    _select_keys_body(q_ptr, sq_t, sq_h, Lq, k_ptr + lo * sk_t, sk_t, sk_h, n, key_ptr + key_off,
                      G, D, POOL, NORM, BLOCK_J, BLOCK_R)


@triton.jit
def _select_top_blocks(key_ptr, blocks_ptr, idx_ptr, BLOCK: tl.constexpr):
    """_select_top on block program_id(1): (Hkv, keep) indices at idx_ptr[index offset:]."""
    b = tl.program_id(1)
    n = tl.load(blocks_ptr + b * 5 + 1).to(tl.int32)
    keep = tl.load(blocks_ptr + b * 5 + 2).to(tl.int32)
    key_off = tl.load(blocks_ptr + b * 5 + 3)
    idx_off = tl.load(blocks_ptr + b * 5 + 4)
    _select_top_body(key_ptr + key_off, n, keep, idx_ptr + idx_off, BLOCK)


@triton.jit
def _gather_kv_blocks(idx_ptr, blocks_ptr, k_ptr, sk_t, sk_h, v_ptr, sv_t, sv_h, out_ptr, so_t, so_h,
                      D: tl.constexpr, BLOCK_R: tl.constexpr):
    """_gather_kv on block program_id(2): rows of k/v[lo:] into its packed rows of ``out``, which
    holds the blocks' packed selections one after the other (row offset = index offset / Hkv)."""
    b = tl.program_id(2)
    lo = tl.load(blocks_ptr + b * 5)
    keep = tl.load(blocks_ptr + b * 5 + 2).to(tl.int32)
    idx_off = tl.load(blocks_ptr + b * 5 + 4)
    hkv = tl.num_programs(1)
    _gather_kv_body(idx_ptr + idx_off, keep, k_ptr + lo * sk_t, sk_t, sk_h, v_ptr + lo * sv_t, sv_t, sv_h,
                    out_ptr + (idx_off // hkv) * so_t, so_t, so_h, D, BLOCK_R)


def _batchable(keep: int, n: int) -> bool:
    """A block the batched kernels take: scored (0 < keep < n) and short enough for _select_top."""
    return 0 < keep < n and triton.next_power_of_2(n) <= MAX_TOP_BLOCK


_BLOCK_TABLES = {}


def _block_table(rows, device):
    """The (lo, n, keep, key offset, index offset) table of ``rows`` on the device, made once per
    set of blocks (a plan's are the same every layer: no host-to-device copy per call)."""
    key = (rows, str(device))
    if key not in _BLOCK_TABLES:
        _BLOCK_TABLES[key] = torch.tensor(rows, dtype=torch.int64, device=device)
    return _BLOCK_TABLES[key]


def select_blocks(q_query, k, v, blocks, pool_window, score):
    """``select`` of every block (lo, hi, keep) of k/v rows [lo, hi), packed selections in block
    order. The scored blocks run in one launch per step (score, top-k, gather); a block kept whole
    or not at all, or too long for _select_top, goes through ``select`` alone."""
    hkv, d = k.shape[1], k.shape[2]
    batch = [(i, lo, hi - lo, keep) for i, (lo, hi, keep) in enumerate(blocks) if _batchable(keep, hi - lo)]
    outs = [None] * len(blocks)
    if len(batch) > 1:
        table, key_at, idx_at = [], 0, 0
        for _, lo, n, keep in batch:
            table.append((lo, n, keep, key_at, idx_at))
            key_at, idx_at = key_at + hkv * n, idx_at + hkv * keep
        meta = _block_table(tuple(table), k.device)
        keys = _keys_buffer((key_at,), k.device)
        idx = torch.empty((idx_at,), dtype=torch.int32, device=k.device)
        packed = torch.empty((idx_at // hkv, hkv, 2 * d), dtype=k.dtype, device=k.device)
        n_max, keep_max = max(b[2] for b in batch), max(b[3] for b in batch)
        block_j = 64 if k.is_cuda else 32
        _select_keys_blocks[(triton.cdiv(n_max, block_j), hkv, len(batch))](
            q_query, q_query.stride(0), q_query.stride(1), q_query.shape[0], k, k.stride(0), k.stride(1), meta, keys,
            G=q_query.shape[1] // hkv, D=d, POOL=pool_window, NORM=(score == "key_norm"), BLOCK_J=block_j,
            BLOCK_R=32, num_warps=4)
        block = triton.next_power_of_2(n_max)
        _select_top_blocks[(hkv, len(batch))](keys, meta, idx, BLOCK=block, num_warps=16 if block >= 8192 else 4)
        block_r = 64 if k.is_cuda else 32
        _gather_kv_blocks[(triton.cdiv(keep_max, block_r), hkv, len(batch))](
            idx, meta, k, k.stride(0), k.stride(1), v, v.stride(0), v.stride(1), packed, packed.stride(0),
            packed.stride(1), D=d, BLOCK_R=block_r, num_warps=4)
        for (i, _, _, keep), (_, _, _, _, at) in zip(batch, table):
            outs[i] = packed[at // hkv: at // hkv + keep]
    for i, (lo, hi, keep) in enumerate(blocks):
        if outs[i] is None:
            outs[i] = select(q_query, k[lo:hi], v[lo:hi], keep, pool_window, score)
    return outs


# ---- LSE merge of partial outputs -------------------------------------------------------------
@triton.jit
def _merge(o_ptr, so_p, so_m, so_h, l_ptr, sl_p, sl_m, sl_h, out_ptr, sout_m, sout_h, lse_ptr, slse_m, slse_h,
           rows, H, P: tl.constexpr, D: tl.constexpr, FP64: tl.constexpr, BLOCK_R: tl.constexpr):
    """out = sum_p exp(lse_p - lse) out_p with lse = log sum_p exp(lse_p), in fp32 (fp64 if given)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = r < rows
    m = (r // H).to(tl.int64)
    h = r % H
    acc_ty = tl.float64 if FP64 else tl.float32
    mx = tl.full([BLOCK_R], float("-inf"), dtype=acc_ty)
    for p in tl.static_range(P):
        lp = tl.load(l_ptr + p * sl_p + m * sl_m + h * sl_h, mask=ok, other=float("-inf")).to(acc_ty)
        mx = tl.maximum(mx, lp)
    m_use = tl.where(mx == float("-inf"), 0.0, mx)
    offs_d = tl.arange(0, D)
    acc = tl.zeros([BLOCK_R, D], dtype=acc_ty)
    den = tl.zeros([BLOCK_R], dtype=acc_ty)
    for p in tl.static_range(P):
        lp = tl.load(l_ptr + p * sl_p + m * sl_m + h * sl_h, mask=ok, other=float("-inf")).to(acc_ty)
        w = tl.exp(lp - m_use)
        den += w
        op = tl.load(o_ptr + p * so_p + m[:, None] * so_m + h[:, None] * so_h + offs_d[None, :], mask=ok[:, None],
                     other=0.0).to(acc_ty)
        acc += w[:, None] * op
    empty = den == 0.0
    d_use = tl.where(empty, 1.0, den)
    tl.store(out_ptr + m[:, None] * sout_m + h[:, None] * sout_h + offs_d[None, :],
             (acc / d_use[:, None]).to(out_ptr.dtype.element_ty), mask=ok[:, None])
    tl.store(lse_ptr + m * slse_m + h * slse_h, tl.where(empty, float("-inf"), m_use + tl.log(d_use)), mask=ok)


@triton.jit
def _merge_pair(a_ptr, sa_m, sa_h, la_ptr, sla_m, sla_h, b_ptr, sb_m, sb_h, lb_ptr, slb_m, slb_h,
                out_ptr, sout_m, sout_h, lse_ptr, slse_m, slse_h, rows, H, D: tl.constexpr, BLOCK_R: tl.constexpr):
    """_merge for two partials held in separate tensors (no stacking copy first), in fp32."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = r < rows
    m = (r // H).to(tl.int64)
    h = r % H
    la = tl.load(la_ptr + m * sla_m + h * sla_h, mask=ok, other=float("-inf")).to(tl.float32)
    lb = tl.load(lb_ptr + m * slb_m + h * slb_h, mask=ok, other=float("-inf")).to(tl.float32)
    mx = tl.maximum(la, lb)
    m_use = tl.where(mx == float("-inf"), 0.0, mx)
    wa = tl.exp(la - m_use)
    wb = tl.exp(lb - m_use)
    den = wa + wb
    offs_d = tl.arange(0, D)
    oa = tl.load(a_ptr + m[:, None] * sa_m + h[:, None] * sa_h + offs_d[None, :], mask=ok[:, None], other=0.0)
    ob = tl.load(b_ptr + m[:, None] * sb_m + h[:, None] * sb_h + offs_d[None, :], mask=ok[:, None], other=0.0)
    acc = wa[:, None] * oa.to(tl.float32) + wb[:, None] * ob.to(tl.float32)
    empty = den == 0.0
    d_use = tl.where(empty, 1.0, den)
    tl.store(out_ptr + m[:, None] * sout_m + h[:, None] * sout_h + offs_d[None, :],
             (acc / d_use[:, None]).to(out_ptr.dtype.element_ty), mask=ok[:, None])
    tl.store(lse_ptr + m * slse_m + h * slse_h, tl.where(empty, float("-inf"), m_use + tl.log(d_use)), mask=ok)


def merge_parts(outs, lses, out=None):
    """merge() of partials given as lists (each out (M, Hq, D) with D contiguous, each lse (M, Hq),
    any strides, dtypes may differ): two are merged where they lie, in fp32; more (or fp64 ones)
    are stacked first, one is copied. The result is in outs[0]'s dtype (or out's)."""
    if len(outs) != len(lses) or not outs:
        raise ValueError(f"merge_parts takes as many lses as outs (at least one), got {len(outs)} and {len(lses)}")
    if len(outs) > 2 or any(t.dtype == torch.float64 for t in (*outs, *lses)):
        lse_dtype = torch.float64 if any(lse.dtype == torch.float64 for lse in lses) else torch.float32
        return merge(torch.stack([o.to(outs[0].dtype) for o in outs]), torch.stack([lse.to(lse_dtype) for lse in lses]),
                     out=out)
    if len(outs) == 1:
        o = outs[0] if out is None else out.copy_(outs[0])
        return o, lses[0].float().contiguous()
    a, b = outs
    la, lb = lses
    M, H, d = a.shape
    if out is None:
        out = torch.empty((M, H, d), dtype=a.dtype, device=a.device)
    lse = torch.empty((M, H), dtype=torch.float32, device=a.device)
    rows = M * H
    if rows == 0:
        return out, lse
    block_r = 32 if a.is_cuda else 16
    _merge_pair[(triton.cdiv(rows, block_r),)](a, a.stride(0), a.stride(1), la, la.stride(0), la.stride(1),
                                               b, b.stride(0), b.stride(1), lb, lb.stride(0), lb.stride(1),
                                               out, out.stride(0), out.stride(1), lse, lse.stride(0), lse.stride(1),
                                               rows, H, D=d, BLOCK_R=block_r, num_warps=4)
    return out, lse


def merge(outs, lses, out=None):
    """outs (P, M, Hq, D), lses (P, M, Hq) -> (out (M, Hq, D) in outs' dtype, lse (M, Hq)).

    ``out``: where to write the merged output (any (M, Hq, D) view with D contiguous; its dtype)."""
    P, M, H, d = outs.shape
    fp64 = outs.dtype == torch.float64 or lses.dtype == torch.float64
    if out is None:
        out = torch.empty((M, H, d), dtype=outs.dtype, device=outs.device)
    lse = torch.empty((M, H), dtype=torch.float64 if fp64 else torch.float32, device=outs.device)
    rows = M * H
    if rows == 0:
        return out, lse
    block_r = 32 if outs.is_cuda else 16
    _merge[(triton.cdiv(rows, block_r),)](outs, outs.stride(0), outs.stride(1), outs.stride(2), lses, lses.stride(0),
                                         lses.stride(1), lses.stride(2), out, out.stride(0), out.stride(1), lse,
                                         lse.stride(0), lse.stride(1), rows, H, P=P, D=d, FP64=fp64,
                                         BLOCK_R=block_r, num_warps=4)
    return out, lse
