"""Two explainer processes (DDP, gloo on CPU) match one process with the same global batch.

Rank r of 2 with batch 4 sees, at every step, half of the images one process sees with batch 8
(EpochSampler); DDP averages the gradients of the two per-process means; lambda_l (each process
measures its shard), the running gradient norms behind lambda_f, the norm-layers' alpha and the
filter losses' statistics are all-reduced. After 2 epochs x 2 steps the explainer's weights, p,
alpha, lambda_l, the gradient-norm means and the filter-loss buffers agree with the
single-process run to float32 round-off (the reduction order differs, nothing else).
"""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from icnn.data import build_dataset
from icnn.explainer import ExplainerConfig, build_explainer, train_explainer
from icnn.training import load_checkpoint
from test_explainer import fc_performer  # same directory (pytest's rootdir-relative import)

RTOL = ATOL = 1e-5
N_IMAGES = 16


def _performer() -> nn.Module:
    """The tiny AlexNet-like performer of test_explainer (two reconstruction targets, hence two
    lambda_l), frozen."""
    return fc_performer(0).requires_grad_(False)


def _data():
    return build_dataset("synthetic", split="train", task="single", image_size=16, num_samples=N_IMAGES)


def _cfg(out, batch_size):
    return ExplainerConfig(epochs=2, batch_size=batch_size, lr=1e-3, seed=3, device="cpu", out=str(out),
                           progress=False, log_every=1)  # fmt: skip


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    res = train_explainer(_performer(), _data(), _cfg(out, 8 // world))
    assert res.rank == rank and res.world_size == world
    assert (res.checkpoint is None) == (rank != 0)  # only rank 0 writes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


@pytest.mark.slow
@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="torch.distributed/gloo not built"
)
def test_two_explainer_processes_match_one(tmp_path):
    torch.set_num_threads(1)
    one = train_explainer(_performer(), _data(), _cfg(tmp_path / "one", 8))
    assert one.rank == 0 and one.world_size == 1
    # fork, not spawn (as tests/training/test_ddp.py): each child sets the torchrun variables
    # and calls train_explainer() as `torchrun -m icnn explain` would.
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path / "two")), nprocs=2, join=True, start_method="fork")
    w1, s1, _ = load_checkpoint(tmp_path / "one")
    w2, s2, _ = load_checkpoint(tmp_path / "two")
    assert s2["world_size"] == 2 and s2["step"] == s1["step"] == 4

    # explainer weights, w_p (p) and the norm-layers' running alpha
    assert w1.keys() == w2.keys()
    assert any(k.endswith("alpha") for k in w1)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=ATOL, rtol=RTOL, msg=k)
    init = build_explainer(_performer()).state_dict()
    assert (w1["w_p"] - init["w_p"]).abs().item() > 1e-3  # training moved p: the comparison is not vacuous
    assert max((w1[k] - init[k]).abs().max().item() for k in init if "conv" in k) > 1e-4

    # lambda_l, the running gradient norms behind lambda_f, the filter losses' statistics
    l1, l2 = s1["objective"], s2["objective"]
    assert l1.keys() == l2.keys()
    assert (l1["loss.lambda_l"] > 0).all() and (l1["loss.f_norm"] > 0).any() and (l1["loss.rec_norm"] > 0).any()
    for k in l1:
        torch.testing.assert_close(l2[k], l1[k], atol=ATOL, rtol=RTOL, msg=k)

    # rank 0 alone wrote the logs; epoch rows are means over both processes
    rows = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "step"] == [1, 2, 3, 4]
    assert [r["epoch"] for r in rows if r["kind"] == "epoch"] == [1, 2]
    m1, m2 = s1["metrics"], s2["metrics"]
    for k in ("loss", "main", "p", "interp2/lambda_f"):
        assert m2[k] == pytest.approx(m1[k], rel=1e-5), k
    print(f"max |two - one|: weights {_max_diff(w1, w2):.3g}, loss buffers {_max_diff(l1, l2):.3g}")
