"""`tune=...`: the search is deterministic, honours the quality floor and memory, and its branch
and bound never prunes a plan that would have won; the report's conclusion, sweep columns, the
trace files and the calibrated preset's provenance."""
import dataclasses
import json

import pytest

from spava_plan.errors import ConfigError
from spava_plan.hydra_conf import compose_config, method_preset
from spava_plan.planner import tune as T
from spava_plan.planner.build import derive
from spava_plan.planner.compare import PHASES, MethodRow
from spava_plan.planner.memory import usable_bytes
from spava_plan.planner.report import conclusion_lines, report_markdown, warning_line

SMALL = ["model=qwen2vl_2b", "frames=64", "video.resolution=360p", "gpus=8"]


@pytest.fixture(scope="module")
def small():
    cfg = compose_config(SMALL + ["tune=latency"])
    return cfg, T.tune(cfg, method_preset)


def _score(target, c):
    return T._score(target, c.ttft_us, c.peak_bytes, c.gpus)


def test_latency_picks_the_fastest_fitting_candidate_deterministically(small):
    cfg, result = small
    best = result.chosen
    assert best is not None and best.fits and best.status == "chosen"
    fitting = [c for c in result.candidates if c.fits]
    assert min(_score("latency", c) for c in fitting) == _score("latency", best)
    again = T.tune(cfg, method_preset)
    assert T.tuning_csv(again) == T.tuning_csv(result)  # same search, same file (no timing or randomness)
    assert all(c.status in ("chosen", "feasible", "rejected", "pruned") for c in result.candidates)
    assert all(c.reason for c in result.candidates)
    assert best.gpus <= 8 and best.cfg.tune.target is None  # the chosen plan is an ordinary plan


def test_pruned_candidates_would_not_have_won_and_bounds_hold(small):
    """Plan every candidate the search pruned: none fits with a better score, and every bound is
    below what the planner predicts (the branch and bound is exact, not a heuristic)."""
    cfg, result = small
    cap = usable_bytes(cfg)
    best = _score("latency", result.chosen)
    for c in result.candidates:
        if c.status == "pruned" or c.ttft_us is not None:
            d = derive(c.cfg, require_fit=False, detail=False)
            t, peak = d.prediction.makespan_us, max(d.prediction.peak_memory_bytes)
            assert c.bound_us <= t * (1 + 1e-9) and c.bound_bytes <= peak, c.knobs()  # 1e-9: float sums
            if c.status == "pruned":
                assert not (peak <= cap and T._score("latency", t, peak, c.gpus) < best), c.knobs()


def test_quality_floor_rejects_star_and_small_passing_unless_allowed(small):
    cfg, result = small
    floor = result.floor_passing
    assert floor == result.paper_passing
    assert all(c.passing_tokens >= floor for c in result.candidates if c.method == "spava")
    star = [c for c in result.candidates if c.method == "star"]
    assert star and all(c.status == "rejected" and "quality floor" in c.reason for c in star)
    low = compose_config(SMALL + ["tune=latency", "tune.min_passing=0", "tune.methods=[spava,star]"])
    allowed = T.tune(low, method_preset)
    assert {c.passing_tokens for c in allowed.candidates if c.method == "spava"} >= {0, result.paper_passing}
    assert not any("quality floor" in c.reason for c in allowed.candidates)
    for c in allowed.candidates:  # star's and low-passing spava's bounds hold too
        if (c.method == "star" or c.passing_tokens == 0) and (c.ttft_us is not None or c.status == "pruned"):
            d = derive(c.cfg, require_fit=False, detail=False)
            assert c.bound_us <= d.prediction.makespan_us * (1 + 1e-9), c.knobs()  # 1e-9: float sums
            assert c.bound_bytes <= max(d.prediction.peak_memory_bytes), c.knobs()


@pytest.mark.parametrize("target", ["memory", "throughput"])
def test_other_targets(target):
    cfg = compose_config(SMALL + [f"tune={target}", "tune.methods=[spava,zigzag_ring]", "tune.hosts_per_gpu=[2]"])
    result = T.tune(cfg, method_preset)
    fitting = [c for c in result.candidates if c.fits]
    assert _score(target, result.chosen) == min(_score(target, c) for c in fitting)


def test_nothing_fits_is_one_clear_error():
    # dense_tp left out: it shards the weights, so 4 GPUs of it fit where no other method does
    cfg = compose_config(SMALL + ["tune=latency", "topology.memory_gib=4", "topology.reserved_gib=1",
                                  "tune.methods=[spava,apb,star,zigzag_ring,dense]"])
    result = T.tune(cfg, method_preset)
    assert result.chosen is None and "No candidate fits" in T.tuning_markdown(result, cfg)
    with pytest.raises(ConfigError.__mro__[1]) as err:  # SpavaError: InfeasiblePlanError naming gpus
        T.chosen_config(result)
    assert "no candidate fits" in str(err.value)


@pytest.mark.parametrize("override, setting", [
    ("tune=fastest", "tune"), ("tune.min_passing=100", "tune.min_passing"), ("tune.methods=[ring]", "tune.methods"),
    ("tune.hosts_per_gpu=[0]", "tune.hosts_per_gpu"),
])
def test_bad_tune_settings_name_the_setting(override, setting):
    with pytest.raises(ConfigError) as err:
        compose_config(SMALL + [override])
    assert setting in str(err.value)


def test_artifacts_of_a_search(small, tmp_path):
    cfg, result = small
    rows = T.tuning_csv(result).splitlines()
    assert rows[0].split(",")[:3] == ["candidate", "method", "gpus"] and len(rows) == 1 + len(result.candidates)
    md = T.tuning_markdown(result, cfg)
    assert "**Chosen:**" in md and f"spava-plan {result.chosen.overrides()}" in md
    data = T.pareto_data(result)
    assert data["chosen"] in data["front"]  # the latency winner is on the TTFT-vs-GPUs front
    T.render_pareto(data, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_gpu_counts():
    assert T.gpu_counts(1) == [1] and T.gpu_counts(8) == [1, 2, 4, 8] and T.gpu_counts(12) == [1, 2, 4, 8, 12]


# -- the report's conclusion ----------------------------------------------------------------------
def _row(method, ms, planned=False, fits=True, attention=0.0):
    phases = dict.fromkeys(PHASES, 0.0)
    phases["attention"] = attention * 1e3
    phases["per-token layers"] = (ms - attention) * 1e3
    return MethodRow(method=method, gpus=8, prefill_us=ms * 1e3, fits=fits, planned=planned, phases=phases)


def test_conclusion_names_the_fastest_and_warns_when_the_plan_is_not_it():
    rows = [_row("spava", 643_021, planned=True, attention=640_000), _row("star", 12_161, attention=9_000),
            _row("zigzag_ring", 2_009_750, attention=2_000_000), _row("dense", 9e9, fits=False)]
    lines = conclusion_lines(rows)
    assert "fastest method that fits is **star**" in lines[0] and "52.88x faster than the next, spava" in lines[0]
    assert "Why: attention" in lines[0]
    warn = warning_line(rows)
    assert warn and warn.startswith("Warning: the planned method, spava") and "52.88x faster" in warn
    assert "passes no context" in warn and "tune=latency" in warn  # what star gives up, and the search
    rows[0], rows[1] = _row("spava", 10_000, planned=True), _row("star", 12_161)
    assert warning_line(rows) is None


def test_report_has_a_conclusion_and_calibration_provenance():
    from spava_plan.planner.build import assemble
    from spava_plan.planner.compare import COMPARED, compare
    from spava_plan.hydra_conf import with_method

    cfg = compose_config(SMALL + ["topology=h200_calibrated"])
    cal = cfg.topology.calibration
    assert cal.device == "NVIDIA H200" and 0 < cal.held_out_mean_abs_error <= cal.held_out_max_abs_error
    d = derive(cfg)
    rows = compare(d, {m: with_method(cfg, m) for m in COMPARED if m != "spava"})
    for r in rows:  # the phases add up to the prediction
        assert sum(r.phases.values()) == pytest.approx(r.prefill_us, rel=1e-9)  # float sums
    plan = assemble(d)
    text = report_markdown(plan, cfg, rows, plan.hash)
    assert "## Conclusion" in text and "fastest method that fits" in text
    assert "calibrated to measurements on NVIDIA H200" in text and "Nothing was held out" in text
    assert "1.3% on average, 1.7% at worst" in text
    plain = report_markdown(plan, compose_config(SMALL), rows, plan.hash)
    assert "is not calibrated" in plain


# -- sweep summary ----------------------------------------------------------------------------------
def test_sweep_columns_and_plot_data():
    from spava_plan.planner.sweep import sweep_plot_data, with_swept_columns

    jobs = [{"job": str(i), "method": "spava", "gpus": g, "prefill_ms": 1.0,
             "_overrides": {"topology": t, "method.passing_tokens": "1024", "gpus": str(g)},
             "_methods": {"spava": 10.0 / g, "dense": 100.0}}
            for i, (t, g) in enumerate([("h100_sxm", 2), ("h100_sxm", 4), ("h200", 2), ("h200", 4)])]
    rows, cols = with_swept_columns(jobs, ("job", "method", "gpus", "prefill_ms"))
    assert cols == ["job", "topology", "method", "gpus", "prefill_ms"]  # passing is not swept: no column
    assert [r["topology"] for r in rows] == ["h100_sxm", "h100_sxm", "h200", "h200"]
    assert not any(k.startswith("_") for r in rows for k in r)
    data = sweep_plot_data(jobs)  # a panel per topology; dense, the reference, is no line
    assert data["x"] == "gpus" and set(data["panels"]) == {"topology=h100_sxm", "topology=h200"}
    assert data["panels"]["topology=h200"] == {"spava": [(2, 20.0), (4, 40.0)]}


# -- traces -----------------------------------------------------------------------------------------
def _check_trace(doc):
    assert doc["displayTimeUnit"] == "ms"
    events = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    names = {e["args"]["name"] for e in doc["traceEvents"] if e["ph"] == "M" and e["name"] == "process_name"}
    for e in events:
        assert {"name", "pid", "tid", "ts", "dur"} <= set(e) and e["dur"] >= 0
    return events, names


def test_predicted_trace_has_the_vision_stage_and_every_rank():
    from spava_plan.planner.build import build_plan
    from spava_plan.planner.timeline import predicted_trace, timeline_data

    plan = build_plan(compose_config(SMALL))
    events, names = _check_trace(json.loads(predicted_trace(plan)))
    assert names == {f"rank {r}" for r in range(8)}
    vision = [e for e in events if e["name"].startswith("vision encoder")]
    assert len(vision) == 8 and vision[0]["dur"] == pytest.approx(plan.prediction.vision_us, abs=1e-3)  # rounding
    end = max(e["ts"] + e["dur"] for e in events)
    assert end == pytest.approx(plan.prediction.makespan_us, rel=1e-6)  # all layers, 3-decimal rounding
    data = timeline_data(plan)
    assert [label for label, _ in data["prefill"]] == [f"rank {r}" for r in range(8)]


def test_rank_groups_cover_every_rank_once():
    from spava_plan.trace import rank_groups

    groups = rank_groups(1000, 16)
    assert len(groups) == 16 and groups[0][0] == 0 and groups[-1][1] == 1000
    assert all(a[1] == b[0] for a, b in zip(groups, groups[1:]))
    assert rank_groups(3, 16) == [(0, 1), (1, 2), (2, 3)]


def test_emulated_timeline_becomes_a_trace():
    from spava_plan.critical_path import Compute, Start, Wait, simulate, spans
    from spava_plan.trace import chrome_trace, emulated_spans

    traces = [[Compute(10.0), Start("c", (0, 1), 5.0), Compute(1.0), Wait("c"), Compute(2.0)],
              [Compute(20.0), Start("c", (0, 1), 5.0), Wait("c"), Compute(2.0)]]
    line = simulate(traces, record=True)
    doc = chrome_trace(emulated_spans(spans(traces, line), 2))
    events, names = _check_trace(doc)
    assert names == {"rank 0", "rank 1"}
    comm = [e for e in events if e["cat"] == "comm"]
    assert [(e["ts"], e["dur"]) for e in comm] == [(20.0, 5.0), (20.0, 5.0)]  # starts when the last rank joins
    stall = [e for e in events if e["name"].startswith("wait")]
    assert [(e["ts"], e["dur"]) for e in stall] == [(11.0, 14.0), (20.0, 5.0)]
    assert max(e["ts"] + e["dur"] for e in events) == line.makespan_us == 27.0


def test_global_passing_candidates_keep_their_floor_and_their_bounds_hold():
    """tune.passing=[per_block,global]: global candidates are planned at their own rule sizes (the
    overrides reproduce them), their bounds hold, and a pruned one would not have won."""
    cfg = compose_config(SMALL + ["tune=latency", "tune.passing=[per_block,global]", "tune.methods=[spava]"])
    result = T.tune(cfg, method_preset)
    glob = [c for c in result.candidates if c.passing == "global"]
    assert glob and all(c.cfg.method.passing == "global" for c in glob)
    best = _score("latency", result.chosen)
    for c in glob:
        if c.status == "rejected" and c.ttft_us is None:
            continue
        d = derive(c.cfg, require_fit=False, detail=False)
        assert d.part.keep == c.passing_tokens and d.part.anchor_tokens == c.anchor_tokens, c.knobs()
        t, peak = d.prediction.makespan_us, max(d.prediction.peak_memory_bytes)
        assert c.bound_us <= t * (1 + 1e-9) and c.bound_bytes <= peak, c.knobs()  # 1e-9: float sums
        if c.status == "pruned":
            assert not (d.fits and T._score("latency", t, peak, c.gpus) < best), c.knobs()
    assert "method.passing=global" in next(c for c in glob).overrides()
    plain = T.tune(compose_config(SMALL + ["tune=latency", "tune.methods=[spava]"]), method_preset)
    assert all(c.passing == "per_block" for c in plain.candidates)  # opt-in: the default search is unchanged
