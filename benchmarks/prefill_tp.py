"""dense_tp in the prefill benchmark: each rank's shard of the model alone on the one GPU, its
all-reduces charged from the plan's topology (benchmarks/prefill.py's ``Runner.tensor_parallel``).

A tensor-parallel rank's all-reduces block it (the next op needs the summed hidden states), so its
TTFT is its compute timed alone plus every all-reduce's time on the plan's links
(spava_plan/links.py, the formula the planner charges): "emulated W-rank", never a measured W-GPU
time. The all-reduces are charged, not done (the rank keeps its own partial sums: ``ChargedComm``),
so its output tokens are meaningless; dense_tp's exactness is tested on CPU against dense
(tests/test_dense_tp.py). The record has the emulated records' fields, so prefill_report.py
summarises it as it does those.
"""
from __future__ import annotations

from typing import Any

TP_GPUS_NOTE = "largest GPU count <= --gpus that divides the q heads and the MLP (spava_plan/tp_shards.py)"


def tp_gpus(model: Any, gpus: int) -> int | None:
    """The largest W <= gpus (a divisor of gpus) dense_tp can shard ``model`` over, None if none."""
    from spava_plan.errors import SpavaError
    from spava_plan.tp_shards import check_tp

    for w in range(gpus, 0, -1):
        if gpus % w:
            continue
        try:
            check_tp(model.num_heads, model.num_kv_heads, model.intermediate_size, w)
            return w
        except SpavaError:
            continue
    return None


def charged_comm(rank: int, world: int, links: Any) -> Any:
    """SoloComm whose all-reduces are charged (accumulated in ``charged_us``) and not done."""
    from spava_plan.links import ALL_REDUCE
    from spava_plan.runtime.solo import SoloComm

    class ChargedComm(SoloComm):
        charged_us = 0.0
        reduces = 0

        def all_reduce(self, t: Any, tag: str = "reduce") -> None:
            self.charged_us += links.transfer_us(ALL_REDUCE, t.numel() * t.element_size(), world)
            self.reduces += 1

    comm = ChargedComm(rank, world)
    comm.label = f"emulated {world}-rank (rank {rank}'s shard alone; all-reduces charged from the plan's links)"
    return comm


class TimedAttention:
    """A TPAttention with its SDPA calls timed as the benchmark's "attention" span."""

    def __init__(self, inner: Any, spans: Any):
        self.inner, self.spans = inner, spans

    def set_prompt_tokens(self, n: int) -> None:
        self.inner.set_prompt_tokens(n)

    def prefill(self, layer: int, q: Any, k: Any, v: Any) -> Any:
        return self.spans.call("attention", lambda: self.inner.prefill(layer, q, k, v))

    def decode(self, layer: int, q: Any, k: Any, v: Any) -> Any:
        return self.spans.call("attention", lambda: self.inner.decode(layer, q, k, v))


def measure(runner: Any, cell: dict, method: str, plan: Any, inputs: Any, positions: Any, repeats: int,
            warmup: int) -> dict:
    """Every rank's shard timed alone ``warmup`` + ``repeats`` times (``runner``: prefill.Runner)."""
    import gc

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from spava_plan.runtime.tensor_parallel import TPAttention, TPRankRunner

    W = plan.world_size
    backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION] if runner.cuda else [SDPBackend.MATH]
    replays, per_rank, logits, tokens = [], [], None, []
    for rank in range(W):
        finish = []
        for i in range(warmup + repeats):
            comm = charged_comm(rank, W, plan.links)
            tp = TPRankRunner(runner.model, plan, comm, runner.device, decode_capacity=8)
            tp.make_attention = lambda: TimedAttention(TPAttention(plan, rank, 8), runner.spans)
            runner.sync()
            base = runner.mem_reset()
            gc.collect()
            gc.disable()
            runner.spans.start()
            t0 = runner.spans.clock.mark()
            with sdpa_kernel(backends), torch.inference_mode():
                result = tp.generate(inputs, positions, 1)
            t1 = runner.spans.clock.mark()
            runner.sync()
            gc.enable()
            ops = runner.spans.stop()
            compute = runner.spans.clock.between_us(t0, t1)
            t = result.timing
            if i < warmup:
                continue
            replays.append({"rank": rank, "i": i - warmup, "compute_us": compute, "vision_us": t.vision_s * 1e6,
                            "prefill_us": t.prefill_s * 1e6,
                            "first_us": (t.first_token_s - t.vision_s - t.prefill_s) * 1e6,
                            "attention_us": ops.get("attention", 0.0), "select_us": 0.0, "merge_us": 0.0,
                            "charged_us": comm.charged_us, "all_reduces": comm.reduces,
                            "peak_bytes": runner.mem_peak(base) + _weights(tp.model) if runner.cuda else 0})
            finish.append(compute + comm.charged_us)
            if rank == 0 and logits is None:
                logits = result.first_logits.detach().float().cpu()
            tokens.append(int(result.tokens[0]))
        per_rank.append(finish)
    per_repeat = []
    for i in range(repeats):
        fin = [per_rank[r][i] for r in range(W)]
        exposed = [next(x["charged_us"] for x in replays if x["rank"] == r and x["i"] == i) for r in range(W)]
        per_repeat.append({"i": i, "ttft_us": max(fin), "rank_finish_us": fin, "exposed_comm_us": exposed})
    import statistics

    median_finish = [statistics.median(per_rank[r]) for r in range(W)]
    ttft = max(median_finish)
    return {"kind": "emulated", "cell": cell["id"], "method": method, "world": W,
            "label": f"emulated {W}-rank tensor parallel on {_device(runner)} (each rank's shard alone, "
                     f"all-reduces charged from the plan's links, not done)",
            "backend": "sdpa " + "+".join(b.name for b in backends), "attention": "sdpa", "attention_tuning": {},
            "warmup": warmup, "functional_passes": 0, "repeats": repeats,
            "ttft_us": ttft, "median_trace_ttft_us": ttft,
            "per_repeat_median_ttft_us": statistics.median(p["ttft_us"] for p in per_repeat),
            "rank_compute_us": [statistics.median(x["compute_us"] for x in replays if x["rank"] == r)
                                for r in range(W)],
            "rank_finish_us": median_finish, "exposed_comm_us": per_repeat[0]["exposed_comm_us"],
            "per_repeat": per_repeat, "replays": replays, "token": tokens[0] if tokens else None,
            # the all-reduces are not done: tokens and logits are not dense's (tests/test_dense_tp.py checks exactness)
            "tokens_agree": None, "_logits": logits, "exactness": "not checked here: all-reduces charged, not done"}


def _device(runner: Any) -> str:
    import torch

    return torch.cuda.get_device_name() if runner.cuda else "cpu"


def _weights(model: Any) -> int:
    """Bytes of the shard's own (sliced) weights plus the shared ones it reads: its parameters."""
    return sum(p.numel() * p.element_size() for p in model.parameters())
