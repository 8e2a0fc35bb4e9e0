"""The regression example (bnn_fast.examples.regression) on torch.distributed: data-parallel
training under DistributedDataParallel, then a sample-parallel prediction with 10^6 samples::

    torchrun --nproc-per-node 2 -m bnn_fast.examples.distributed            # CPU, gloo
    torchrun --nproc-per-node 2 -m bnn_fast.examples.distributed --backend nccl   # one GPU a rank
    python -m bnn_fast.examples.distributed --samples 100000                 # one process

Each rank trains on its share of the 500 training points (the article's MSE + 0.01 * KL; DDP
averages the data term over the ranks, the KL is on every rank: see docs/distributed.md), then
every rank draws its share of the posterior samples on the 300 test points and rank 0 receives
the merged mean and std, prints the timings and saves the figure (``--out``). The prediction is
the one a single process gets with ``predictive(..., seed=s, chunk_seeds=True)``.

Started without torchrun (no ``RANK`` in the environment), it runs as a group of one process on
127.0.0.1.
"""
from __future__ import annotations

import argparse
import datetime
import os
import socket
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

import bnn_fast as bnn
from bnn_fast.examples.regression import make_data, make_model, plot, train
from bnn_fast.predictive import predictive


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="torchrun --nproc-per-node N -m bnn_fast.examples.distributed",
        description="Train the regression example data-parallel, predict sample-parallel.",
    )
    parser.add_argument("--backend", choices=["gloo", "nccl"], default="gloo",
                        help="gloo (CPU, default) or nccl (one CUDA GPU per rank)")
    parser.add_argument("--steps", type=int, default=2000, help="training steps (default: 2000)")
    parser.add_argument("--samples", type=int, default=1_000_000,
                        help="posterior samples, over all ranks (default: 1000000)")
    parser.add_argument("--seed", type=int, default=0, help="training and prediction seed")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per rank (default: the CPU count / ranks on the node)")
    parser.add_argument("--independent-noise", action="store_true",
                        help="each rank draws its own weight noise in training "
                             "(bnn_fast.distributed.independent_noise)")
    parser.add_argument("--out", type=Path, default=Path("distributed.png"),
                        help="the figure, saved by rank 0 (default: distributed.png)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    if args.steps < 0 or args.samples < 1:
        parser.error("--steps must be >= 0 and --samples >= 1")
    if args.backend == "nccl" and not torch.cuda.is_available():
        parser.error("--backend nccl: no CUDA GPU is available")
    return args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(backend: str) -> str:
    """Joins the process group torchrun describes (or makes one of a single process); returns
    this rank's device."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    if (backend == "gloo" and os.environ.get("MASTER_ADDR") in ("127.0.0.1", "localhost")
            and os.path.exists("/sys/class/net/lo")):
        # One machine: keep gloo's connections on the loopback interface.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    device = "cpu"
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
    return device


def main(argv: Optional[Sequence[str]] = None) -> Optional[dict]:
    args = parse_args(argv)
    device = init(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // local_world))
        if device == "cpu":
            bnn.utils.retain_cpu_memory()
        progress = not args.no_progress and rank == 0
        torch.manual_seed(args.seed)  # the same data and initial weights on every rank
        x, y = make_data(500, device)
        model = bnn.fuse(make_model()).to(device)
        ddp = nn.parallel.DistributedDataParallel(model)
        if args.independent_noise:
            bnn.distributed.independent_noise()

        dist.barrier()
        start = time.perf_counter()
        # Each rank's share of the points; DDP averages the gradients, so the objective is the
        # article's (the mean MSE over all points + 0.01 * KL) when the shares are equal.
        losses = train(ddp, x[rank::world], y[rank::world], args.steps, progress) if args.steps else []
        dist.barrier()
        train_seconds = time.perf_counter() - start
        bnn.distributed.independent_noise(enabled=False)

        x_test, y_test = make_data(300, device)
        model.eval()
        dist.barrier()
        start = time.perf_counter()
        result = predictive(model, x_test, args.samples, seed=args.seed, group="default",
                            all_ranks=False, progress=progress)
        predict_seconds = time.perf_counter() - start
        if rank != 0:
            return None
        print(f"{bnn.backend()}\nworld size {world} ({args.backend}, {device} on rank 0, "
              f"{torch.get_num_threads()} threads a rank)")
        if losses:
            print(f"training: {args.steps} steps in {train_seconds:.2f} s "
                  f"(rank 0's loss {losses[0]:.2f} -> {losses[-1]:.2f})")
        print(f"prediction: {args.samples:,} samples on {len(x_test)} points in "
              f"{predict_seconds:.2f} s ({predict_seconds / args.samples * 1e6:.2f} us a sample, "
              f"chunks of {result.chunk_size})")
        plot(x_test, y_test, result, args.out)
        print(f"figure: {args.out.resolve()}")
        return {"world": world, "train_seconds": train_seconds, "predict_seconds": predict_seconds,
                "losses": losses, "result": result}
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
