"""AdaHessian under torch.distributed (gloo, 2 CPU processes, each with half the batch): both ranks end with the
same parameters, equal to one process that saw the whole batch."""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from hhfft.optim import AdaHessian

STEPS, BATCH = 4, 8


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 6, 1)).double()


def _data(t):
    g = torch.Generator().manual_seed(t)
    return torch.randn(BATCH, 2, 8, generator=g, dtype=torch.float64), torch.randn(BATCH, 1, generator=g,
                                                                                dtype=torch.float64)


def _train(rank: int, world: int):
    model = _model()
    # Different global seeds per rank: the probes must still agree (the generator's seed comes from rank 0).
    torch.manual_seed(100 + rank)
    opt = AdaHessian(model.parameters(), lr=0.1, n_samples=2, update_each=2, fused=False)
    for t in range(STEPS):
        x, y = _data(t)
        part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        opt.zero_grad()
        (model(x[part]) - y[part]).pow(2).mean().backward(create_graph=opt.hessian_due)
        opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _train_two_heads(rank: int, world: int):
    """Rank r's loss reads head r only (a data-dependent branch): a parameter has a gradient on one rank."""
    torch.manual_seed(0)
    heads = nn.ModuleList([nn.Linear(3, 1), nn.Linear(3, 1)]).double()
    torch.manual_seed(100 + rank)
    opt = AdaHessian(heads.parameters(), lr=0.1, update_each=2, fused=False)
    for t in range(STEPS):
        x = torch.randn(4, 3, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
        opt.zero_grad()
        if world == 1:  # the mean of the two ranks' losses
            loss = (heads[0](x[:2]).pow(2).mean() + heads[1](x[2:]).pow(2).mean()) / 2
        else:
            loss = heads[rank](x[2 * rank:2 * rank + 2]).pow(2).mean()
        loss.backward(create_graph=opt.hessian_due)
        opt.step()
    return torch.cat([p.detach().flatten() for p in heads.parameters()])


def _worker(rank: int, world: int, port: int, out_dir: str, train=_train):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(train(rank, world), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_match_one_process_on_the_whole_batch(tmp_path):
    # fork: the children inherit the imported modules (spawn re-imports torch and hhfft: 10-20 s more on 2 cores)
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    torch.manual_seed(100)  # what rank 0 had
    single = _train(0, 1)
    assert torch.equal(r0, r1), "ranks diverged"
    torch.testing.assert_close(r0, single, rtol=1e-10, atol=1e-12)


def test_a_parameter_with_a_gradient_on_one_rank_only(tmp_path):
    """Each rank must all-reduce the same parameters: the one without a gradient on this rank counts as zeros (the
    lists differed, and gloo aborted or, at equal sizes, averaged one head's gradient into the other)."""
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path), _train_two_heads), nprocs=2, join=True,
                       start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    torch.manual_seed(100)
    single = _train_two_heads(0, 1)
    assert torch.equal(r0, r1), "ranks diverged"
    torch.testing.assert_close(r0, single, rtol=1e-10, atol=1e-12)
