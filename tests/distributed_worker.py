"""One rank of the 2-process gloo runs of tests/test_distributed.py (started by that test, not
collected by pytest): ``python tests/distributed_worker.py SCENARIO OUT_DIR`` (SCENARIO: predict,
train, or all: both in one process group) with RANK,
WORLD_SIZE, MASTER_ADDR (127.0.0.1) and MASTER_PORT set. Saves what it computed to
``OUT_DIR/rank{r}.pt`` for the test to compare with one process."""
from __future__ import annotations

import datetime
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import bnn_fast as bnn
from bnn_fast.distributed import RankFailed, independent_noise
from bnn_fast.predictive import predictive, predictive_classification

# The collectives' own limit: a hung collective fails here, well inside the test's timeout.
TIMEOUT = datetime.timedelta(seconds=40)

X = torch.linspace(-2, 2, 7, dtype=torch.float64).unsqueeze(1)
QUANTILES = [0.05, 0.5, 0.9]
# (name, keyword arguments) of the predictive calls compared with one process.
CASES = [
    ("fixed_chunks", dict(n_samples=103, chunk_size=10, seed=5, quantiles=QUANTILES)),
    ("auto_chunks", dict(n_samples=57, seed=11)),
    ("one_chunk_rank0_idle", dict(n_samples=2, chunk_size=5, seed=3, return_samples=True)),
    ("sketch", dict(n_samples=3000, chunk_size=64, seed=2, quantiles=QUANTILES,
                    memory_budget_mb=0.05)),
]


def regression_model(dtype=torch.float64) -> nn.Module:
    """A small 1-32-1 Bayesian MLP (the fused path in prediction)."""
    torch.manual_seed(0)
    return nn.Sequential(bnn.BayesLinear(0, 0.1, 1, 32), nn.ReLU(),
                         bnn.BayesLinear(0, 0.1, 32, 1)).to(dtype)


def classifier() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(bnn.BayesLinear(0, 0.5, 1, 16), nn.ReLU(),
                         bnn.BayesLinear(0, 0.5, 16, 3)).double()


class Dropout(nn.Module):
    """An MC-dropout model: no Bayesian layer, so plain passes drawing with torch's generator."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.body = nn.Sequential(nn.Linear(1, 16), nn.Dropout(0.5), nn.Linear(16, 1)).double()
        self.body.train()

    def forward(self, x):
        return self.body(x)


class FailsOnRank1(nn.Module):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.inner = regression_model()
        self.rank = rank

    def forward(self, x):
        if self.rank == 1:
            raise RuntimeError("rank 1's model fails")
        return self.inner(x)


def expect_failure(call) -> str:
    try:
        call()
    except (RankFailed, ValueError, TypeError, RuntimeError) as e:
        return type(e).__name__
    return "no error"


def predict(rank: int) -> dict:
    out = {}
    model = regression_model()
    for name, kwargs in CASES:
        out[name] = predictive(model, X, group="default", **kwargs)
    out["rank0_only"] = predictive(model, X, 40, chunk_size=7, seed=1, group="default",
                                   all_ranks=False)
    out["classification"] = predictive_classification(classifier(), X, 90, chunk_size=8, seed=4,
                                                      group="default")
    out["dropout"] = predictive(Dropout(), X, 30, chunk_size=4, seed=6, group="default")
    # A process group of one rank (new_group is entered by every rank).
    alone = dist.new_group([0])
    if rank == 0:
        out["group_of_one"] = predictive(model, X, 50, chunk_size=6, seed=9, group=alone)
    # Bad arguments on one rank, different arguments, a model failing on one rank: every rank
    # raises, none waits.
    out["bad_on_rank1"] = expect_failure(
        lambda: predictive(model, X, 0 if rank == 1 else 10, group="default"))
    out["mismatch"] = expect_failure(
        lambda: predictive(model, X, 10, seed=rank, group="default"))
    out["model_fails_on_rank1"] = expect_failure(
        lambda: predictive(FailsOnRank1(rank), X, 10, chunk_size=2, group="default"))
    out["after_failures"] = predictive(model, X, 20, chunk_size=3, seed=7, group="default")
    return out


def train(rank: int) -> dict:
    """DDP on a FusedSequential: 40 steps of Adam on each rank's half of the data."""
    torch.manual_seed(0)
    x = torch.linspace(-2, 2, 64).unsqueeze(1)
    y = x.pow(3) - 2 * x + 0.1 * torch.randn(x.shape)
    x, y = x[rank::2], y[rank::2]  # each rank's shard
    model = bnn.fuse(nn.Sequential(bnn.BayesLinear(0, 0.1, 1, 16), nn.ReLU(),
                                   bnn.BayesLinear(0, 0.1, 16, 1)))
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.Adam(ddp.parameters(), lr=0.02)
    kl_loss = bnn.BKLLoss(reduction="sum")
    losses = []
    for _ in range(40):
        # The data term averaged over ranks by DDP; the full KL on every rank, over the data set.
        loss = nn.functional.mse_loss(ddp(x), y) + kl_loss(model) / 64
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    probe = torch.linspace(-1, 1, 5).unsqueeze(1)
    with torch.no_grad():
        torch.manual_seed(123)
        shared = model(probe)
        torch.manual_seed(123)
        with independent_noise():
            own = model(probe)
        torch.manual_seed(123)
        again = model(probe)  # the setting is off again after the block
    return {
        "losses": losses,
        "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "shared": shared, "own": own, "again": again,
    }


def main() -> None:
    scenario, out_dir = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=TIMEOUT)
    rank = dist.get_rank()
    try:
        result = {}
        for name in ("predict", "train") if scenario == "all" else (scenario,):
            result.update({"predict": predict, "train": train}[name](rank))
        torch.save(result, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
