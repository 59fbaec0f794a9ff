"""One attention layer for one rank, executing the plan's schedule.

    attn = RankAttention(plan, rank, comm, backend)      # backend: TorchBackend() by default
    out = attn.prefill(layer, q, k, v)                   # local rows, post-RoPE
    out = attn.decode(layer, q_new, k_new, v_new)        # new tokens, replicated on every rank

Prefill follows ``plan.schedule[rank].ops`` in order (see ``spava_plan.plan.Op``): ``select``
scores, top-k's and packs this rank's blocks; ``start:``/``wait:`` launch and complete the
selection all-gathers, the query (out, lse) all-gather and the ring steps; ``attend`` runs one
backend launch for a group of tasks (ring: restricted to the keys of one step); ``merge``
LSE-merges the query partials. The same code runs every method (spava, apb, star, zigzag_ring,
dense): they differ only in their plans. With global passing (a ``select_scan`` collective,
method.passing=global) ``select`` ranks each host's top-P candidates and ``start:scan`` runs the
prefix scan of runtime/passing_scan.py, after which each host slot's passing buffer holds the P
best keys of all earlier hosts.

Every size comes from the plan: the selection and query buffers are allocated once (per dtype and
device) and reused by every layer; no size is negotiated at run time. KV sources are views of the
local K/V, of the gathered selections, of the ring buffer or of the broadcast anchor's buffer
(method.anchor=broadcast: rank 0 packs its anchor rows' K|V there after its qkv and sends them; the
other ranks hold no anchor row and read it from there); nothing is concatenated.

Questions shorter than the plan's capacity (``plan.video.max_question_tokens``): the caller pads the
query segment at its end (the prompt then has ``plan.layout.total_tokens`` rows as always) and
calls ``set_prompt_tokens(n)`` with the real prompt length before prefill. Every size, collective
and kernel stays the plan's; only runtime row bounds change, so the real rows get exact attention:
- pad rows are the last tokens of the sequence, so a causal source never shows them to a real row;
- a full-mask source that holds pad tokens (APB's blocks read the query; a ring chunk) is cut
  before them (a segment's length is a runtime value of the kernels);
- the selection's query mean is taken over the real query rows only;
- the KV cache keeps no pad token, so decode continues exactly after the real prompt.
Pad rows compute finite values that nothing real reads.

Errors: the first call checks the plan against the launched world and the inputs against the plan
on every rank, then all ranks agree on the outcome (one small object all-gather) and raise the
same SpavaError naming the rank and what differs. Later calls check locally and report a failure
to the peers, whose pending communication then fails with a DistributedError quoting it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from spava_plan.errors import InputError, PlanMismatchError, SpavaError
from spava_plan.plan import KVRef, Plan, RankPlan, attended_in_step

from . import checks
from .backends.base import KVSegment, TaskInput
from .backends.torch_ref import TorchBackend, softmax_scale
from .comm import Communicator, DoneHandle
from .kv_cache import KVCacheShard
from .passing_scan import GlobalScan, candidates

_SCORER = TorchBackend()  # global passing scores with torch ops (the selection's reference scorer)


@dataclass(frozen=True)
class _Source:
    """A KV source resolved to rows of one buffer."""

    # "local" (this rank's K/V) | "passing" (slot's gathered selections) | "remote" (ring buffer) |
    # "anchor" (the broadcast anchor's receive buffer, rows = global tokens of the anchor)
    kind: str
    mask: str
    lo: int
    hi: int
    slot: int = -1
    owner: int = -1


@dataclass(frozen=True)
class _Task:
    name: str
    lo: int  # local rows of the queries
    hi: int
    sources: tuple[_Source, ...]
    merge: str


class _Run:
    """Per-call state of one prefill: inputs, outputs, in-flight communication, partials."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.q, self.k, self.v = q, k, v
        self.out = torch.empty_like(q)
        self.packed: dict[int, torch.Tensor] = {}  # slot -> this rank's packed selection
        self.handles: dict[tuple[str, int], Any] = {}  # (collective, ring step) -> in-flight handle
        self.query_partial: tuple[torch.Tensor, torch.Tensor] | None = None
        self.ring_cur: torch.Tensor | None = None
        self.ring_next: torch.Tensor | None = None
        self.ring_acc: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


class RankAttention:
    """Spava (or a baseline) attention of one rank, for every layer of the plan's model."""

    def __init__(self, plan: Plan, rank: int, comm: Communicator, backend: Any = None, *,
                 decode_capacity: int = 256):
        checks.check_world(plan, rank, comm.world_size)
        if comm.rank != rank:
            raise PlanMismatchError(f"RankAttention for rank {rank} was given the communicator of rank {comm.rank}",
                                    setting="rank")
        self.plan, self.rank, self.comm = plan, rank, comm
        self.backend = backend if backend is not None else TorchBackend()
        self.rp: RankPlan = plan.ranks[rank]
        self.ops = plan.schedule[rank].ops
        self.W = plan.world_size
        self.model = plan.model
        self.scale = softmax_scale(plan.model.head_dim)
        self.selection = plan.selection.score
        self.pool_window = plan.selection.pool_window
        self.decode_capacity = decode_capacity
        self.collectives = {c.name: c for c in plan.collectives}
        # passing sources name their selection by slot; its buffer is that slot's collective's
        self.slot_collective = {c.slot: c.name for c in plan.collectives if c.kind == "select_all_gather"}
        # global passing (a select_scan collective): each host slot's buffer is the scan's result
        scan = next((c for c in plan.collectives if c.kind == "select_scan"), None)
        self.scan = None if scan is None else GlobalScan(plan.placement.host_rank, rank, self.rp.hosts,
                                                         scan.rows_per_rank)
        if scan is not None:
            self.slot_collective = {s: f"scan{s}" for s in range(len(self.rp.hosts))}
        self._scan_bufs: dict[str, torch.Tensor] | None = None
        # method.anchor=broadcast: rank 0 packs its anchor rows' K|V into the buffer and sends it;
        # every other rank receives it there and reads its "anchor" sources from it
        self.anchor = next((c for c in plan.collectives if c.kind == "anchor_broadcast"), None)
        self.n_local = self.rp.local_tokens
        self.query_rows = self._query_rows()
        self.select_rows = [(sel.slot, self._rows(sel.start, sel.stop), sel.keep) for sel in self.rp.select]
        self.set_prompt_tokens(plan.layout.total_tokens)
        self._check_coverage()
        self.caches: list[KVCacheShard | None] = [None] * plan.model.num_layers
        self._buffers: dict[tuple, dict[str, torch.Tensor]] = {}
        self._agreed = False

    # -- the request's prompt length --------------------------------------------------------------
    def set_prompt_tokens(self, n: int) -> None:
        """The real prompt length of the next prefill (the rest of the plan's rows are query padding).

        ``n`` must keep the whole context and at least one query token: context_tokens < n <=
        total_tokens. Call it before ``prefill``; it resets nothing else."""
        lay = self.plan.layout
        if not isinstance(n, int) or not lay.context_tokens < n <= lay.total_tokens:
            raise PlanMismatchError(f"rank {self.rank}: a prompt of {n} tokens does not fit the plan's layout "
                                    f"({lay.context_tokens} context tokens + up to {lay.query_tokens} query tokens); "
                                    f"re-plan with video.max_question_tokens large enough for the question",
                                    setting="video.max_question_tokens")
        self.prompt_tokens = n
        self.tasks = {t.name: self._resolve(t.name, t.q_start, t.q_stop, t.kv, t.merge) for t in self.rp.tasks}
        # (source, lo, hi) of every cache part: local rows, or rows of the received anchor
        self.cache_rows = [("anchor", a, min(b, n)) if self._received(a, b) else ("local", *self._rows(a, min(b, n)))
                           for a, b in self.rp.cache]
        self.query_select_rows = None
        if self.query_rows is not None:
            qa, qb = self.query_rows
            start = lay.segment("query").start
            self.query_select_rows = (qa, qa + min(qb - qa, n - start))

    # -- static resolution of the plan -------------------------------------------------------------
    def _received(self, start: int, stop: int) -> bool:
        """Tokens [start, stop) are anchor rows this rank receives rather than holds."""
        return (self.anchor is not None and self.rank != 0 and stop <= self.anchor.rows_per_rank
                and start < stop)

    def _rows(self, start: int, stop: int, rank_plan: RankPlan | None = None) -> tuple[int, int]:
        """Local rows [lo, hi) of global tokens [start, stop) on ``rank_plan`` (default: this rank)."""
        rp = rank_plan or self.rp
        if stop <= start:
            return (0, 0)
        lo = rp.local_offset(start)
        hi = rp.local_offset(stop - 1) + 1
        if hi - lo != stop - start:
            raise PlanMismatchError(f"plan inconsistency: tokens [{start}, {stop}) are not contiguous in rank "
                                    f"{rp.rank}'s local sequence", setting="plan")
        return lo, hi

    def _query_rows(self) -> tuple[int, int] | None:
        try:
            seg = self.plan.layout.segment("query")
        except KeyError:
            return None
        if not any(a <= seg.start < b for a, b in self.rp.local):
            return None
        return self._rows(seg.start, seg.stop)

    def _key_stop(self, ref: KVRef, q_stop: int) -> int:
        """Global end of a source's keys for the current prompt: a full-mask source stops before the
        query padding; a causal one keeps its span (pad keys come after every real row, and the
        bottom-right alignment needs the whole span)."""
        if ref.mask == "full":
            return max(ref.start, min(ref.stop, self.prompt_tokens))
        assert ref.stop <= self.prompt_tokens or ref.stop == q_stop, "pad keys only end the sequence"
        return ref.stop

    def _resolve(self, name: str, start: int, stop: int, refs: tuple[KVRef, ...], merge: str) -> _Task:
        sources = []
        for ref in refs:
            if ref.kind == "local":
                sources.append(_Source("local", ref.mask, *self._rows(ref.start, self._key_stop(ref, stop))))
            elif ref.kind == "passing":
                sources.append(_Source("passing", ref.mask, ref.rank_start * ref.keep, ref.rank_stop * ref.keep,
                                       slot=ref.slot))
            elif ref.kind == "remote":
                lo, hi = self._rows(ref.start, self._key_stop(ref, stop), self.plan.ranks[ref.owner])
                sources.append(_Source("remote", ref.mask, lo, hi, owner=ref.owner))
            elif ref.kind == "anchor":  # the anchor starts the prompt: buffer row = global token
                if not self._received(ref.start, ref.stop):
                    raise PlanMismatchError(f"plan inconsistency: task {name} of rank {self.rank} reads anchor "
                                            f"tokens [{ref.start}, {ref.stop}) that the anchor broadcast does not "
                                            f"bring", setting="plan")
                sources.append(_Source("anchor", ref.mask, ref.start, self._key_stop(ref, stop), owner=ref.owner))
            else:
                raise PlanMismatchError(f"unknown KV source kind {ref.kind!r} in task {name}", setting="plan")
        lo, hi = self._rows(start, stop)
        return _Task(name, lo, hi, tuple(sources), merge)

    def _check_coverage(self) -> None:
        """Every local row is computed by exactly one task (a plan invariant worth a clear error)."""
        at = 0
        for t in sorted(self.tasks.values(), key=lambda t: t.lo):
            if t.lo != at:
                raise PlanMismatchError(f"plan inconsistency: rank {self.rank}'s local rows from {min(at, t.lo)} are "
                                        f"{'computed twice' if t.lo < at else 'not computed'} (task {t.name})",
                                        setting="plan")
            at = t.hi
        if at != self.n_local:
            raise PlanMismatchError(f"plan inconsistency: rank {self.rank}'s local rows {at}..{self.n_local} are not "
                                    f"computed by any task", setting="plan")

    # -- static buffers ----------------------------------------------------------------------------
    def _buf(self, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
        key = (dtype, device)
        if key in self._buffers:
            return self._buffers[key]
        hkv, hq, d = self.model.num_kv_heads, self.model.num_heads, self.model.head_dim
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        bufs: dict[str, torch.Tensor] = {}
        for c in self.plan.collectives:
            if c.kind == "select_all_gather":
                bufs[c.name] = torch.empty((self.W * c.rows_per_rank, hkv, 2 * d), dtype=dtype, device=device)
            elif c.kind == "query_all_gather":
                # (out | lse) per row and head, in the accumulation dtype so the merge is exact
                bufs["query_send"] = torch.empty((c.rows_per_rank, hq, d + 1), dtype=acc, device=device)
                bufs["query_recv"] = torch.empty((self.W * c.rows_per_rank, hq, d + 1), dtype=acc, device=device)
            elif c.kind == "ring":
                for name in ("ring_own", "ring_recv"):
                    bufs[name] = torch.zeros((c.rows_per_rank, hkv, 2 * d), dtype=dtype, device=device)
            elif c.kind == "anchor_broadcast":
                bufs["anchor"] = torch.empty((c.rows_per_rank, hkv, 2 * d), dtype=dtype, device=device)
            elif c.kind == "select_scan":
                assert self.scan is not None
                scan = self.scan.buffers(hkv, 2 * d, dtype, device)
                bufs.update(scan)
                for slot in range(len(self.rp.hosts)):
                    bufs[f"scan{slot}"] = scan["state_kv"][slot]
        self._buffers[key] = bufs
        return bufs

    # -- agreement on the first call ---------------------------------------------------------------
    def _agree(self, local_error: SpavaError | None) -> None:
        """First call: all ranks exchange (plan hash, local check result) and fail together."""
        if self._agreed:
            if local_error is not None:
                self.comm.report_failure(local_error)
                raise local_error
            return
        mine = (self.plan.hash, None if local_error is None else (type(local_error).__name__, str(local_error)))
        seen = self.comm.all_gather_object(mine)
        errors = [(r, e) for r, (_, e) in enumerate(seen) if e is not None]
        if local_error is not None:
            raise local_error
        if errors:
            r, (kind, text) = errors[0]
            cls = PlanMismatchError if kind == "PlanMismatchError" else InputError
            raise cls(f"rank {self.rank}: rank {r} rejected its input: {text}", setting="runtime")
        hashes = {h for h, _ in seen}
        if len(hashes) > 1:
            which = ", ".join(f"rank {r} {h[:12]}" for r, (h, _) in enumerate(seen))
            raise PlanMismatchError(f"the ranks run different plans ({which}); give every rank the same plan.json",
                                    setting="plan")
        self._agreed = True

    def _checked(self, layer: int, q: Any, k: Any, v: Any, rows: int | None, what: str) -> None:
        error: SpavaError | None = None
        try:
            checks.check_layer(self.plan, layer)
            n = rows if rows is not None else (q.shape[0] if isinstance(q, torch.Tensor) and q.dim() == 3 else -1)
            checks.check_qkv(self.plan, self.rank, n, q, k, v, what)
            if rows is None and n < 1:
                raise InputError(f"rank {self.rank} {what}: needs at least one new token", setting="q")
        except SpavaError as exc:
            error = exc
        self._agree(error)

    # -- prefill -----------------------------------------------------------------------------------
    def prefill(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (N_local, Hq, D), k/v (N_local, Hkv, D), rows in ``plan.ranks[rank].local`` order,
        post-RoPE. Returns (N_local, Hq, D): the attention output of every local row (query rows
        identical on every rank). Stores this layer's KV cache shard."""
        self._checked(layer, q, k, v, self.n_local, f"prefill layer {layer}")
        try:
            run = _Run(q, k, v)
            bufs = self._buf(q.dtype, q.device)
            for op in self.ops:
                self._execute(op, run, bufs)
            self._finish_query(run, bufs)
            self._store_cache(layer, k, v, bufs)
            return run.out
        except BaseException as exc:
            self.comm.report_failure(exc)
            raise

    def _execute(self, op: Any, run: _Run, bufs: dict[str, torch.Tensor]) -> None:
        if op.kind == "compute" and op.name in ("qkv", "out_mlp"):
            return  # the model's own per-token work
        if op.kind == "compute" and op.name == "select":
            self._select(run, bufs)
        elif op.kind == "comm_start":
            self._start(op, run, bufs)
        elif op.kind == "comm_wait":
            run.handles.pop((op.collective, op.step)).wait()
            if op.collective == "ring":
                run.ring_cur, run.ring_next = run.ring_next, run.ring_cur
        elif op.kind == "compute" and op.name == "attend":
            self._attend(op, run, bufs)
        elif op.kind == "compute" and op.name == "merge":
            self._merge_query(run, bufs)
        else:
            raise PlanMismatchError(f"unknown op {op.kind}:{op.name} in rank {self.rank}'s schedule", setting="plan")

    def _select(self, run: _Run, bufs: dict[str, torch.Tensor]) -> None:
        assert self.query_select_rows is not None, "selection needs the query block on this rank"
        qa, qb = self.query_select_rows  # the real query rows (no padding)
        if self.scan is not None:  # global passing: each host's top-keep candidates, ranked
            for (slot, (lo, hi), keep), sel in zip(self.select_rows, self.rp.select):
                scores = _SCORER.scores(run.q[qa:qb], run.k[lo:hi], self.pool_window, self.selection)
                candidates(scores, run.k[lo:hi], run.v[lo:hi], sel.start, keep, bufs["cand_kv"][slot],
                           bufs["cand_side"][slot])
            return
        # every block of this rank at once: the backend may batch them (one launch per step)
        packed = self.backend.select_blocks(run.q[qa:qb], run.k, run.v, [(lo, hi, keep) for _, (lo, hi), keep
                                                                          in self.select_rows],
                                            self.pool_window, self.selection)
        for (slot, _, _), sel in zip(self.select_rows, packed):
            run.packed[slot] = sel

    def _start(self, op: Any, run: _Run, bufs: dict[str, torch.Tensor]) -> None:
        name = (op.collective, op.step)
        coll = self.collectives[op.collective]
        if coll.kind == "select_all_gather":
            run.handles[name] = self.comm.all_gather_into_tensor(bufs[coll.name], run.packed[coll.slot],
                                                                 async_op=True, tag=coll.name)
        elif coll.kind == "query_all_gather":
            assert run.query_partial is not None, "the query partial must be computed before its all-gather"
            out, lse = run.query_partial
            send = bufs["query_send"]
            d = self.model.head_dim
            send[..., :d] = out
            send[..., d] = lse
            run.handles[name] = self.comm.all_gather_into_tensor(bufs["query_recv"], send, async_op=True,
                                                                 tag=coll.name)
        elif coll.kind == "anchor_broadcast":
            # Rank 0 sends its anchor rows' K/V as soon as its qkv is done (the first op of the
            # layer); the others post the receive now and wait just before the first launch that
            # reads it (planner/schedule.py says why the anchor goes per layer).
            buf = bufs["anchor"]
            if self.rank == 0:
                d, a = self.model.head_dim, coll.rows_per_rank
                lo, _ = self._rows(0, a)
                buf[..., :d] = run.k[lo:lo + a]
                buf[..., d:] = run.v[lo:lo + a]
            run.handles[name] = self.comm.broadcast(buf, src=0, tag=coll.name, async_op=True)
        elif coll.kind == "select_scan":
            assert self.scan is not None
            self.scan.run(self.comm, bufs)  # its rounds merge between transfers: run to the end here
            self._scan_bufs = bufs
            run.handles[name] = DoneHandle()
        elif coll.kind == "ring":
            if run.ring_cur is None:
                # Step 1 sends this rank's own K|V; later steps forward what arrived. Two buffers
                # suffice: after a step's wait, the buffer just sent is free to receive into.
                own = bufs["ring_own"]
                d = self.model.head_dim
                own[: self.n_local, :, :d] = run.k
                own[: self.n_local, :, d:] = run.v
                run.ring_cur, run.ring_next = own, bufs["ring_recv"]
            dst, src = (self.rank + 1) % self.W, (self.rank - 1) % self.W
            run.handles[name] = self.comm.exchange(run.ring_cur, dst, run.ring_next, src, tag=coll.name)
        else:
            raise PlanMismatchError(f"unknown collective kind {coll.kind!r}", setting="plan")

    def _segments(self, task: _Task, run: _Run, bufs: dict[str, torch.Tensor], step: int) -> list[KVSegment]:
        """The task's KV sources (those of ring step ``step``; -1: not a ring step) as views."""
        d = self.model.head_dim
        segs = []
        for s in task.sources:
            if not attended_in_step(s.kind, s.owner, self.rank, self.W, step):
                continue
            if s.kind == "local":
                segs.append(KVSegment(run.k[s.lo:s.hi], run.v[s.lo:s.hi], s.mask))
            elif s.kind == "passing":
                buf = bufs[self.slot_collective[s.slot]][s.lo:s.hi]
                segs.append(KVSegment(buf[..., :d], buf[..., d:], s.mask))
            elif s.kind == "remote":
                assert run.ring_cur is not None
                buf = run.ring_cur[s.lo:s.hi]
                segs.append(KVSegment(buf[..., :d], buf[..., d:], s.mask))
            elif s.kind == "anchor":
                buf = bufs["anchor"][s.lo:s.hi]
                segs.append(KVSegment(buf[..., :d], buf[..., d:], s.mask))
        return segs

    def _attend(self, op: Any, run: _Run, bufs: dict[str, torch.Tensor]) -> None:
        tasks = [self.tasks[n] for n in op.tasks]
        inputs, kept = [], []
        for t in tasks:
            segs = self._segments(t, run, bufs, op.step)
            if op.step >= 0 and not segs:
                continue  # nothing of this ring step's owner for this chunk
            final = t.merge == "none" and op.step < 0
            inputs.append(TaskInput(t.name, run.q[t.lo:t.hi], tuple(segs), out=run.out[t.lo:t.hi] if final else None))
            kept.append(t)
        results = self.backend.attention(inputs, self.scale) if inputs else []
        for t, (out, lse) in zip(kept, results):
            if t.merge == "query":
                run.query_partial = (out, lse)
            elif op.step >= 0:
                if t.name in run.ring_acc:  # merged into the accumulator as they lie (no stacked copy)
                    o0, l0 = run.ring_acc[t.name]
                    out, lse = self.backend.merge_parts([o0, out], [l0, lse])
                else:
                    out = out.to(lse.dtype)  # ring partials stay in the accumulation dtype across steps
                run.ring_acc[t.name] = (out, lse)
        if op.step == self.W - 1:  # last ring step: the chunks' rows are final
            for t in tasks:
                run.out[t.lo:t.hi] = run.ring_acc.pop(t.name)[0]

    def _merge_query(self, run: _Run, bufs: dict[str, torch.Tensor]) -> None:
        assert self.query_rows is not None
        d = self.model.head_dim
        recv = bufs["query_recv"]
        lq = recv.shape[0] // self.W
        gathered = recv.view(self.W, lq, self.model.num_heads, d + 1)
        out, _ = self.backend.merge(gathered[..., :d], gathered[..., d])
        qa, qb = self.query_rows
        run.out[qa:qb] = out
        run.query_partial = None

    def _finish_query(self, run: _Run, bufs: dict[str, torch.Tensor]) -> None:
        """A query partial with no query collective (one rank) is already exact."""
        if run.query_partial is not None:
            assert self.query_rows is not None and "query" not in self.collectives
            qa, qb = self.query_rows
            run.out[qa:qb] = run.query_partial[0]
        assert not run.handles, f"schedule left communication in flight: {sorted(run.handles)}"

    def _store_cache(self, layer: int, k: torch.Tensor, v: torch.Tensor, bufs: dict[str, torch.Tensor]) -> None:
        d = self.model.head_dim
        anchor = bufs.get("anchor")
        parts = [(k[lo:hi], v[lo:hi]) if src == "local" else (anchor[lo:hi, :, :d], anchor[lo:hi, :, d:])  # type: ignore[index]
                 for src, lo, hi in self.cache_rows]
        self.caches[layer] = KVCacheShard(parts, self.decode_capacity if self.rp.decode_appends else 0)

    # -- decode ------------------------------------------------------------------------------------
    def decode(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """T new tokens, replicated on every rank: q (T, Hq, D), k/v (T, Hkv, D), post-RoPE.
        Each rank attends its cache shard (the appending rank also the new tokens, causally), then
        (out, lse) are all-gathered and LSE-merged: exact attention, identical on every rank."""
        self._checked(layer, q, k, v, None, f"decode layer {layer}")
        try:
            cache = self.caches[layer]
            if cache is None:
                raise InputError(f"rank {self.rank}: decode of layer {layer} before its prefill", setting="layer")
            segs = []
            if cache.length:
                segs.append(KVSegment(cache.k, cache.v, "full"))
            if self.rp.decode_appends:
                segs.append(KVSegment(k, v, "causal"))
            (out, lse), = self.backend.attention([TaskInput("decode", q, tuple(segs))], self.scale)
            if self.W > 1:
                d, t = self.model.head_dim, q.shape[0]
                acc = torch.float64 if q.dtype == torch.float64 else torch.float32
                mine = torch.empty((t, self.model.num_heads, d + 1), dtype=acc, device=q.device)
                mine[..., :d] = out
                mine[..., d] = lse
                every = self.comm.all_gather(mine, tag="decode")
                out, _ = self.backend.merge(every[..., :d], every[..., d])
                out = out.to(q.dtype)
            if self.rp.decode_appends:
                cache.append(k, v)
            return out
        except BaseException as exc:
            self.comm.report_failure(exc)
            raise

    def passing_positions(self) -> dict[int, torch.Tensor]:
        """Global passing: host -> (keep, Hkv) global positions of the keys its passing block held
        in the last prefill (hosts > 0; for tests and the fidelity harness). Empty otherwise."""
        if self._scan_bufs is None:
            return {}
        side = self._scan_bufs["state_side"]
        return {v: side[s, ..., 1].to(torch.long) for s, v in enumerate(self.rp.hosts) if v > 0}

    def kv_cache(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(k, v) of this rank's cache shard of ``layer`` (views; None before its prefill)."""
        cache = self.caches[layer]
        return (None, None) if cache is None else (cache.k, cache.v)
