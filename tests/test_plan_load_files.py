"""load_plan reads regular files only, checks the size before reading and refuses duplicate JSON
keys: a FIFO never blocks, a device is refused at once, a key named twice is named."""
import os
import subprocess
import sys
import time

import pytest

from spava_plan.errors import PlanFormatError
from spava_plan.hydra_conf import compose_config
from spava_plan.plan_load import MAX_PLAN_BYTES, load_plan
from spava_plan.planner.build import build_plan

TINY = ["model=tiny", "gpus=2", "frames=8", "video.resolution=360p", "method.anchor_tokens=64"]


@pytest.fixture(scope="module")
def plan_text():
    return build_plan(compose_config(TINY)).to_json()


def refusal(path) -> str:
    with pytest.raises(PlanFormatError) as err:
        load_plan(path)
    text = str(err.value)
    assert text.startswith("plan: ") and "\n" not in text
    return text


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "p.fifo"
    os.mkfifo(fifo)
    (tmp_path / "link.json").symlink_to(fifo)
    # in a child with a timeout: today's open() blocks forever waiting for a writer
    code = ("import sys\nfrom spava_plan.plan_load import load_plan\nfrom spava_plan.errors import PlanFormatError\n"
            "for p in sys.argv[1:]:\n    try:\n        load_plan(p)\n    except PlanFormatError as e:\n"
            "        print(e)\n")
    res = subprocess.run([sys.executable, "-c", code, str(fifo), str(tmp_path / "link.json")], capture_output=True,
                         text=True, timeout=60)
    lines = res.stdout.splitlines()
    assert res.returncode == 0 and len(lines) == 2, res.stdout + res.stderr
    assert all("is not a regular file" in line and line.startswith("plan: ") for line in lines), lines


@pytest.mark.parametrize("device", ["/dev/urandom", "/dev/zero"])
def test_a_device_is_refused_before_reading(device):
    if not os.path.exists(device):
        pytest.skip(f"no {device}")
    start = time.monotonic()
    assert "is not a regular file" in refusal(device)
    assert time.monotonic() - start < 1.0  # nothing read (today: 512 MiB first)


def test_a_folder_and_an_oversized_file_are_refused_by_their_metadata(tmp_path):
    assert "is a folder" in refusal(tmp_path)
    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(MAX_PLAN_BYTES + 1)  # sparse: the size alone refuses it
    assert f"larger than {MAX_PLAN_BYTES >> 20} MiB" in refusal(big)


@pytest.mark.parametrize("where", ["top", "nested"])
def test_a_duplicate_key_is_refused_naming_it(tmp_path, plan_text, where):
    if where == "top":  # json.loads keeps the last "method" silently
        text = plan_text.replace("{", '{\n "method": "zigzag_ring",', 1)
        key = "method"
    else:
        text = plan_text.replace('"world_size": 2', '"world_size": 2, "world_size": 2', 1)
        key = "world_size"
        assert text != plan_text
    (tmp_path / "plan.json").write_text(text)
    assert f"duplicate key '{key}'" in refusal(tmp_path / "plan.json")


def test_the_plan_itself_still_loads(tmp_path, plan_text):
    (tmp_path / "plan.json").write_text(plan_text)
    assert load_plan(tmp_path / "plan.json").to_json() == plan_text
