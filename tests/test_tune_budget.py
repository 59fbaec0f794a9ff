"""The tuner's work is bounded like the solver's: a stated budget that the message names; a space
too large to bound is refused before any work; repeated list entries are folded."""
import time

import pytest

from spava_plan.errors import ConfigError, SpavaError
from spava_plan.hydra_conf import compose_config, method_preset
from spava_plan.planner import tune as T

SMALL = ["model=qwen2vl_2b", "frames=64", "video.resolution=360p", "gpus=8", "tune=latency"]


def test_the_1024_gpu_search_of_the_issue_is_refused_at_once_naming_the_budget():
    cfg = compose_config(["tune=latency", "gpus=1024", "frames=131072", "topology=h200", "tune.min_passing=0",
                          "tune.min_anchor=0", "tune.hosts_per_gpu=[1,2,4,8,16,32,64]"])
    start = time.process_time()
    with pytest.raises(ConfigError) as err:
        T.tune(cfg, method_preset)
    assert time.process_time() - start < 5  # refused from the sizes of the lists, before any candidate is built
    text = str(err.value)
    assert text.startswith("tune: ") and f"budget of {T.MAX_TUNE_BOUND_HOSTS:,}" in text and "tune.hosts_per_gpu" in text


def test_repeated_entries_are_folded():
    once = T.candidates(compose_config(SMALL + ["tune.methods=[star,spava]", "tune.hosts_per_gpu=[2]"]),
                        method_preset)[0]
    many = T.candidates(compose_config(SMALL + ["tune.methods=[" + ",".join(["star"] * 2000) + ",spava,star]",
                                                "tune.hosts_per_gpu=[2,2,2,2]"]), method_preset)[0]
    assert [c.knobs() for c in many] == [c.knobs() for c in once]


def test_a_space_with_too_many_candidates_is_refused(monkeypatch):
    monkeypatch.setattr(T, "MAX_TUNE_CANDIDATES", 10)
    with pytest.raises(ConfigError, match=r"^tune: the search has \d+ candidates .* limit of 10;"):
        T.candidates(compose_config(SMALL), method_preset)


def test_the_planning_budget_leaves_candidates_unplanned_and_says_so(monkeypatch):
    cfg = compose_config(SMALL)
    full = T.tune(cfg, method_preset)
    assert full.unplanned == 0 and "work budget" not in T.describe(full)
    works = sorted(T.plan_work(c) for c in full.candidates if c.ttft_us is not None)
    monkeypatch.setattr(T, "TUNE_WORK_BUDGET", sum(works[:2]))  # room for about two plans
    cut = T.tune(cfg, method_preset)
    assert cut.unplanned > 0 and cut.planned < full.planned and cut.chosen is not None
    assert sum(T.plan_work(c) for c in cut.candidates if c.ttft_us is not None) <= T.TUNE_WORK_BUDGET
    assert all("work budget" in c.reason for c in cut.candidates if c.status == "unplanned")
    assert f"work budget ({T.TUNE_WORK_BUDGET:,} units" in T.describe(cut)
    assert "were not planned" in T.tuning_markdown(cut, cfg)
    monkeypatch.setattr(T, "TUNE_WORK_BUDGET", 0)
    none = T.tune(cfg, method_preset)
    assert none.chosen is None and none.planned == 0
    with pytest.raises(SpavaError, match=r"^tune: tune=latency: the tuner's work budget \(0 units"):
        T.chosen_config(none)
