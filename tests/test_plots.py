"""sweep.png draws what a sweep compares (a panel per value of the other swept keys, the legend
outside the data); pareto.png plots the search's target."""
import pytest

from spava_plan.hydra_conf import compose_config, method_preset
from spava_plan.planner import tune as T
from spava_plan.planner.memory import GIB
from spava_plan.planner.sweep import render_sweep, sweep_plot_data


def readme_sweep_rows():
    """Rows as the README's `-m gpus=2,4,8 frames=256,1024,2048 method=spava,zigzag_ring` gives them
    (each job also compared every other method, as compare() does)."""
    rows, job = [], 0
    for g in (2, 4, 8):
        for f in (256, 1024, 2048):
            for m in ("spava", "zigzag_ring"):
                if (g, f) != (2, 2048):  # does not fit: an error row without _methods
                    methods = {"spava": 1e3 * f / g, "zigzag_ring": 2e3 * f / g, "apb": 1.5e3 * f / g,
                               "star": 1.2e3 * f / g, "dense": 1e4 * f}
                    rows.append({"job": str(job), "method": m, "_methods": methods,
                                 "_overrides": {"gpus": str(g), "frames": str(f), "method": m}})
                job += 1
    return rows


def test_the_readme_sweep_gets_a_panel_per_gpu_count_with_only_the_swept_methods(tmp_path):
    data = sweep_plot_data(readme_sweep_rows())
    assert data["x"] == "frames" and list(data["panels"]) == ["gpus=2", "gpus=4", "gpus=8"]
    assert all(set(lines) == {"spava", "zigzag_ring"} for lines in data["panels"].values())  # not 30 lines
    assert data["panels"]["gpus=2"]["spava"] == [(256, pytest.approx(20.0)), (1024, pytest.approx(20.0))]
    fig = render_sweep(data, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    renderer = fig.canvas.get_renderer()
    legend = fig.legends[0].get_window_extent(renderer)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 3 and not any(legend.overlaps(ax.get_window_extent(renderer)) for ax in axes)


def test_without_a_method_sweep_every_compared_method_but_dense_is_drawn():
    rows = [r for r in readme_sweep_rows() if r["method"] == "spava"]
    for r in rows:
        del r["_overrides"]["method"]
    data = sweep_plot_data(rows)
    assert set(data["panels"]["gpus=4"]) == {"spava", "zigzag_ring", "apb", "star"}


@pytest.mark.parametrize("target, expect", [("memory", "memory"), ("throughput", "GPU-seconds"), ("latency", "first token")])
def test_pareto_plots_the_target(tmp_path, target, expect):
    cfg = compose_config(["model=qwen2vl_2b", "frames=64", "video.resolution=360p", "gpus=8", f"tune={target}",
                          "tune.methods=[spava,zigzag_ring]", "tune.hosts_per_gpu=[2]"])
    result = T.tune(cfg, method_preset)
    data = T.pareto_data(result)
    c = result.chosen
    want = {"memory": c.peak_bytes / GIB, "throughput": c.gpu_seconds, "latency": c.ttft_us / 1e3}[target]
    assert data["chosen"] == (c.gpus, pytest.approx(want)) and expect in data["ylabel"]
    assert min(y for _, y in data["front"]) == pytest.approx(want)  # the chosen plan is the best of its target
    T.render_pareto(data, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
