"""Global passing on one rank (``method.passing=global``): every host's top-P candidates, and the
prefix scan that leaves host v the P best keys of all hosts < v (spava_plan/passing_scan.py holds
the round structure and why it is a scan).

A candidate set is P rows per KV head, ordered by (score descending, position ascending):
- kv   (P, Hkv, 2D) in the run dtype: packed K|V (post-RoPE), as the attention kernels read them;
- side (P, Hkv, 2) fp64: the pooled fp32 selection score and the global token position (fp64
  holds both exactly), so a merge ranks by score and breaks ties by position on every rank alike.
Scores are the per-block ones of the per_block mode (runtime/backends/torch_ref.py ``scores``:
query-mean GEMV, max-pool inside the block); torch ops suffice here (a sort of 2P rows per head).

Every buffer is allocated once from the plan's sizes (P, the rank's hosts, the messages of the
busiest round) and reused by every layer.
"""
from __future__ import annotations

import torch

from spava_plan.passing_scan import rank_round, scan_rounds

from .comm import Communicator


def candidates(scores: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, keep: int,
               out_kv: torch.Tensor, out_side: torch.Tensor) -> None:
    """The top ``keep`` of one block per KV head, written in (score desc, position asc) order.
    scores (n, Hkv) fp32 pooled scores of the block's tokens [start, start + n)."""
    n, hkv, d = k.shape
    # stable: among equal scores the earlier token comes first (the tie rule of every backend)
    order = torch.sort(scores, dim=0, descending=True, stable=True).indices[:keep]  # (keep, Hkv)
    idx = order.unsqueeze(-1).expand(keep, hkv, d)
    out_kv[..., :d] = torch.gather(k, 0, idx)
    out_kv[..., d:] = torch.gather(v, 0, idx)
    out_side[..., 0] = torch.gather(scores, 0, order).to(torch.float64)
    out_side[..., 1] = (order + start).to(torch.float64)


def merge_top(a_kv: torch.Tensor, a_side: torch.Tensor, b_kv: torch.Tensor, b_side: torch.Tensor,
              out_kv: torch.Tensor, out_side: torch.Tensor) -> None:
    """out <- the best rows of a | b per KV head by (score desc, position asc); out may be b."""
    keep = out_kv.shape[0]
    side = torch.cat([a_side, b_side])  # (2P, Hkv, 2)
    kv = torch.cat([a_kv, b_kv])
    by_pos = torch.sort(side[..., 1], dim=0, stable=True).indices
    score = torch.gather(side[..., 0], 0, by_pos)
    best = torch.gather(by_pos, 0, torch.sort(score, dim=0, descending=True, stable=True).indices[:keep])
    out_side.copy_(torch.gather(side, 0, best.unsqueeze(-1).expand(keep, side.shape[1], 2)))
    out_kv.copy_(torch.gather(kv, 0, best.unsqueeze(-1).expand(keep, kv.shape[1], kv.shape[2])))


class GlobalScan:
    """The scan of one rank: its rounds (messages per peer) and static buffers."""

    def __init__(self, host_rank: tuple[int, ...], rank: int, hosts: tuple[int, ...], keep: int):
        self.rank, self.keep = rank, keep
        self.slot = {v: s for s, v in enumerate(hosts)}
        self.rounds = [rank_round(host_rank, k, rank) for k in range(scan_rounds(len(host_rank)))]
        # the most messages this rank sends / receives in one round: the static buffer sizes
        self.max_send = max((sum(map(len, send)) for send, _ in self.rounds), default=0)
        self.max_recv = max((sum(map(len, recv)) for _, recv in self.rounds), default=0)
        self._bufs: dict[tuple, dict[str, torch.Tensor]] = {}

    def buffers(self, hkv: int, two_d: int, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
        key = (hkv, two_d, dtype, device)
        if key not in self._bufs:
            h, p = len(self.slot), self.keep
            f64 = torch.float64
            self._bufs[key] = {
                "cand_kv": torch.empty((h, p, hkv, two_d), dtype=dtype, device=device),
                "cand_side": torch.empty((h, p, hkv, 2), dtype=f64, device=device),
                "state_kv": torch.zeros((h, p, hkv, two_d), dtype=dtype, device=device),  # the passing buffers
                "state_side": torch.zeros((h, p, hkv, 2), dtype=f64, device=device),
                "send_kv": torch.empty((self.max_send * p, hkv, two_d), dtype=dtype, device=device),
                "send_side": torch.empty((self.max_send * p, hkv, 2), dtype=f64, device=device),
                "recv_kv": torch.empty((self.max_recv * p, hkv, two_d), dtype=dtype, device=device),
                "recv_side": torch.empty((self.max_recv * p, hkv, 2), dtype=f64, device=device),
            }
        return self._bufs[key]

    def run(self, comm: Communicator, bufs: dict[str, torch.Tensor]) -> None:
        """Every round, in order: pack what this rank's hosts send, two all-to-alls (K|V, side),
        then each receiving host takes (round 0) or merges (later rounds) what arrived. The
        candidates (``cand_*``) must be filled; the result is ``state_*`` per slot (host 0 none)."""
        p, world = self.keep, comm.world_size
        for k, (send, recv) in enumerate(self.rounds):
            src_kv, src_side = (bufs["cand_kv"], bufs["cand_side"]) if k == 0 else (bufs["state_kv"], bufs["state_side"])
            row = 0
            for d in range(world):
                for m in send[d] if d < len(send) else ():
                    s = self.slot[m.src]
                    bufs["send_kv"][row:row + p] = src_kv[s]
                    bufs["send_side"][row:row + p] = src_side[s]
                    row += p
            in_splits = [p * len(send[d]) if d < len(send) else 0 for d in range(world)]
            out_splits = [p * len(recv[s]) if s < len(recv) else 0 for s in range(world)]
            n_in, n_out = sum(in_splits), sum(out_splits)
            comm.all_to_all_single(bufs["recv_kv"][:n_out], bufs["send_kv"][:n_in], out_splits, in_splits,
                                   tag="scan-kv")
            comm.all_to_all_single(bufs["recv_side"][:n_out], bufs["send_side"][:n_in], out_splits, in_splits,
                                   tag="scan-side")
            row = 0
            for s_rank in range(world):
                for m in recv[s_rank] if s_rank < len(recv) else ():
                    s = self.slot[m.dst]
                    got_kv, got_side = bufs["recv_kv"][row:row + p], bufs["recv_side"][row:row + p]
                    row += p
                    if m.merge:  # the sender's hosts all come before the receiver's: left side
                        merge_top(got_kv, got_side, bufs["state_kv"][s], bufs["state_side"][s],
                                  bufs["state_kv"][s], bufs["state_side"][s])
                    else:
                        bufs["state_kv"][s].copy_(got_kv)
                        bufs["state_side"][s].copy_(got_side)
