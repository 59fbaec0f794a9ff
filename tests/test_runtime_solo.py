"""Single-rank mode (runtime/solo.py): one rank of any plan alone, peers' data random."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from spava_plan.entry import run  # noqa: E402
from spava_plan.hydra_conf import compose_config  # noqa: E402
from spava_plan.planner.build import build_plan  # noqa: E402
from spava_plan.runtime.solo import SoloComm  # noqa: E402


def test_solo_comm_keeps_this_ranks_data_and_fills_the_peers():
    comm = SoloComm(2, 4)
    inp = torch.full((3, 5), 7.0)
    out = torch.zeros(12, 5)
    comm.all_gather_into_tensor(out, inp, async_op=True).wait()
    assert torch.equal(out[6:9], inp)
    assert not torch.equal(out[:6], torch.zeros(6, 5)) and (out[:6] != 7.0).all()  # random, not left as is
    send = torch.arange(10.0).reshape(10, 1)
    recv = torch.zeros(9, 1)
    # this rank sends rows [3, 7) to itself and receives 4 of its 9 rows from itself, after 5 from ranks 0-1
    comm.all_to_all_single(recv, send, out_splits=[2, 3, 4, 0], in_splits=[1, 2, 4, 3])
    assert torch.equal(recv[5:9], send[3:7])
    token = torch.tensor([9])
    comm.broadcast(token, src=0)
    assert token.item() == 0  # ids from a peer are 0: valid in any vocabulary
    mine = torch.tensor([1.5])
    comm.broadcast(mine, src=2)
    assert mine.item() == 1.5
    assert comm.all_gather_object("x") == ["x"] * 4
    assert "single-rank" in comm.label
    with pytest.raises(ValueError):
        SoloComm(4, 4)


@pytest.mark.parametrize("method,gpus", [("spava", 3), ("apb", 2), ("star", 2), ("zigzag_ring", 2), ("dense", 1)])
def test_single_rank_mode_runs_every_methods_plan(tmp_path, capsys, method, gpus):
    plan = build_plan(compose_config(["model=tiny", f"gpus={gpus}", "frames=32", "video.resolution=224x224",
                                      f"method={method}", "kernels=false"]))
    path = plan.save(tmp_path / "plan.json")
    rank = gpus - 1
    rc = run.main([f"plan={path}", "model.init=random", f"rank={rank}", "max_new_tokens=2", "device=cpu"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert f"single-rank (rank {rank} of {gpus} alone" in out.out
    assert f"timing (rank {rank}, single-rank)" in out.out and "answer (single-rank" in out.out


def test_single_rank_mode_refuses_a_rank_outside_the_plan(tmp_path, capsys):
    plan = build_plan(compose_config(["model=tiny", "gpus=2", "frames=32", "video.resolution=224x224",
                                      "kernels=false"]))
    path = plan.save(tmp_path / "plan.json")
    rc = run.main([f"plan={path}", "model.init=random", "rank=2", "device=cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "rank" in err[0] and "0..1" in err[0], err
