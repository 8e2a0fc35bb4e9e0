"""Sample-parallel prediction on torch.distributed: the seed article's 10^5-sample prediction.

The network is the article's 1-1000-1 MLP (bnn_fast.examples.regression.make_model, seeded
weights, untrained: the cost of a sample does not depend on the weights), predicting on 300
points of linspace(-2, 2) with ``predictive(..., seed=0)`` on the fixed chunk grid.

CPU (``--device cpu``, the default), on the same cores:

  a. one process, 2 threads: ``predictive(model, x, S, seed=0, chunk_seeds=True)``;
  b. two processes, 1 thread each, gloo on 127.0.0.1: ``predictive(..., group="default")``,
     timed on each rank between barriers (the slower rank's time);
  c. one process, 1 thread (the per-sample cost of one core, for the parallel efficiency).

  Efficiency on the same cores = a / b (threads against processes on 2 cores); parallel
  efficiency = c / (2 b); CPU-work efficiency = c's CPU time / b's (both ranks'), which other
  jobs on the cores do not skew. Each round runs a, c, then b (the two ranks started afresh, their
  start-up not timed, one untimed 2,000-sample call first); medians over --rounds rounds
  (default 3). Also the largest difference between b's mean and std and a's (the same samples:
  float64 summation order only) and the time of the collective that merges the statistics.

CUDA (``--device cuda``): plain ``predictive`` on the GPU against the NCCL path at world size 1
(one rank, ``group="default"``), the overhead of the distributed path.

Writes results/distributed_<device>.json and .md with the machine's description (as the other
suites, plus the git commit) and the CPU seconds other processes used during the run.

  python -m benchmarks.bench_distributed [--device cpu|cuda] [--rounds 3] [--quick]

--quick: 10^4 samples instead of 10^5, one round.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import bnn_fast
from bnn_fast.examples.regression import make_data, make_model
from bnn_fast.predictive import predictive
from benchmarks import harness

SAMPLES, QUICK_SAMPLES = 100_000, 10_000
WARM_SAMPLES = 2_000
ROUNDS = 5
ROOT = Path(__file__).resolve().parent.parent


def setup(device: str):
    if device == "cpu":
        # As the other suites and the examples run (see bnn_fast.utils.retain_cpu_memory).
        bnn_fast.utils.retain_cpu_memory()
    torch.manual_seed(0)
    model = make_model().to(device).eval()
    x, _ = make_data(300, device)
    return model, x


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn, device: str) -> tuple[float, object, float, float]:
    """(wall seconds, fn's result, CPU seconds of this process (all its threads), CPU seconds
    of the whole machine meanwhile)."""
    sync(device)
    busy, start, cpu = harness.cpu_seconds()[0], time.perf_counter(), time.process_time()
    out = fn()
    sync(device)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return wall, out, cpu, harness.cpu_seconds()[0] - busy


# ----------------------------------------------------------------------------------------------
# One rank (started by run_ranks with BENCH_DISTRIBUTED set)


def worker() -> None:
    import torch.distributed as dist

    from bnn_fast.distributed import Comm

    config = json.loads(os.environ["BENCH_DISTRIBUTED"])
    torch.set_num_threads(config["threads"])
    backend = config["backend"]
    device = "cpu"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        device = "cuda"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=300))
    try:
        model, x = setup(device)
        n = config["samples"]

        def call(samples):
            return predictive(model, x, samples, seed=0, group="default")

        call(WARM_SAMPLES)
        dist.barrier()
        seconds, result, cpu, busy = time_call(lambda: call(n), device)
        # The slowest rank's time is the call's; the CPU time is the ranks' sum.
        slowest = torch.tensor([seconds], dtype=torch.float64, device=device)  # NCCL: on the GPU
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        cpu_total = torch.tensor([cpu], dtype=torch.float64, device=device)
        dist.all_reduce(cpu_total)
        # The collective that merges mean and M2: one gather of 1 + 2 * 300 float64 a rank.
        comm = Comm(dist.group.WORLD)
        packed = torch.zeros(1 + 2 * x.shape[0], dtype=torch.float64)
        comm.gather(packed, True)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(20):
            comm.gather(packed, True)
        gather_seconds = (time.perf_counter() - start) / 20
        if dist.get_rank() == 0:
            # The machine's CPU seconds beyond the ranks' own: other jobs on the cores.
            torch.save({"seconds": float(slowest), "cpu_seconds": float(cpu_total),
                        "others_cpu_seconds": busy - float(cpu_total),
                        "gather_seconds": gather_seconds,
                        "mean": result.mean.cpu(), "std": result.std.cpu(),
                        "chunk_size": result.chunk_size},
                       Path(config["out"]) / "rank0.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world: int, threads: int, samples: int, backend: str) -> dict:
    """Starts `world` ranks of this module on 127.0.0.1; returns rank 0's measurements."""
    with tempfile.TemporaryDirectory() as out:
        config = json.dumps({"threads": threads, "samples": samples, "backend": backend, "out": out})
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                   WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), GLOO_SOCKET_IFNAME="lo",
                   OMP_NUM_THREADS=str(threads), BENCH_DISTRIBUTED=config)
        procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.bench_distributed"], cwd=ROOT,
                                  env=dict(env, RANK=str(r), LOCAL_RANK=str(r)))
                 for r in range(world)]
        codes = [p.wait(timeout=600) for p in procs]
        if any(codes):
            raise RuntimeError(f"a rank failed: exit codes {codes}")
        return torch.load(Path(out) / "rank0.pt")


# ----------------------------------------------------------------------------------------------
# The suite


# The rows of the results' measurements, by their key in the summary's median_s.
CONFIGURATIONS = {"1proc_2threads": "1 process x 2 threads", "2procs_1thread": "2 gloo processes x 1 thread",
                  "1proc_1thread": "1 process x 1 thread", "plain": "1 process, no group",
                  "nccl_world1": "NCCL group of 1"}


def bench_cpu(args, samples: int, rounds: int) -> tuple[list, dict]:
    model, x = setup("cpu")

    def one_process(threads: int):
        torch.set_num_threads(threads)
        predictive(model, x, WARM_SAMPLES, seed=0, chunk_seeds=True)
        return time_call(lambda: predictive(model, x, samples, seed=0, chunk_seeds=True), "cpu")

    times = {"a": [], "b": [], "c": []}
    cpu = {"a": [], "b": [], "c": []}
    others = {"a": [], "b": [], "c": []}  # other processes' CPU seconds during each call
    gathers, reference, ranks = [], None, None
    for i in range(rounds):
        for key, threads in (("a", 2), ("c", 1)):
            seconds, result, cpu_seconds, busy = one_process(threads)
            times[key].append(seconds)
            cpu[key].append(cpu_seconds)
            others[key].append(busy - cpu_seconds)
            reference = result if key == "a" else reference
        ranks = run_ranks(2, 1, samples, "gloo")
        times["b"].append(ranks["seconds"])
        cpu["b"].append(ranks["cpu_seconds"])
        others["b"].append(ranks["others_cpu_seconds"])
        gathers.append(ranks["gather_seconds"])
        print(f"round {i + 1}/{rounds}: " + ", ".join(
            f"{name} {times[k][-1]:.3f} s (others {others[k][-1]:.2f} CPU s)"
            for k, name in (("a", "1 process x 2 threads"), ("c", "1 process x 1 thread"),
                            ("b", "2 processes x 1 thread"))), flush=True)
    torch.set_num_threads(args.threads)
    # Quiet rounds: no other process used more than a tenth of a core during any of the calls.
    quiet = [i for i in range(rounds)
             if all(others[k][i] <= 0.1 * times[k][i] for k in "abc")]
    kept = quiet or list(range(rounds))
    a, b, c = (statistics.median(times[k][i] for i in kept) for k in "abc")
    cpu_a, cpu_b, cpu_c = (statistics.median(cpu[k][i] for i in kept) for k in "abc")
    rows = [
        [name, f"{t:.3f} s", f"{t / samples * 1e6:.2f} us", f"{u:.3f} s"]
        for name, t, u in (("1 process, 2 threads", a, cpu_a),
                           ("2 processes (gloo), 1 thread each", b, cpu_b),
                           ("1 process, 1 thread", c, cpu_c))
    ]
    summary = {
        "samples": samples,
        "rounds": rounds,
        "chunk_size": ranks["chunk_size"],
        "seconds": times,
        "cpu_seconds": cpu,
        "others_cpu_seconds": others,
        "quiet_rounds": len(quiet),
        "medians_over": "quiet rounds" if quiet else "all rounds (none was quiet)",
        "median_s": {"1proc_2threads": a, "2procs_1thread": b, "1proc_1thread": c},
        "efficiency_same_cores": a / b,
        "parallel_efficiency": c / (2 * b),
        # Load-independent: the CPU work of the 2 ranks against one process on one thread.
        "cpu_work_efficiency": cpu_c / cpu_b,
        "merge_gather_seconds_median": statistics.median(gathers),
        "max_abs_diff_mean": float((ranks["mean"] - reference.mean).abs().max()),
        "max_abs_diff_std": float((ranks["std"] - reference.std).abs().max()),
    }
    print(f"efficiency on the same 2 cores (1 process x 2 threads / 2 processes x 1 thread): "
          f"{summary['efficiency_same_cores']:.2f}")
    print(f"parallel efficiency (1 thread / (2 x 2 processes)): {summary['parallel_efficiency']:.2f}")
    print(f"CPU-work efficiency (1 thread / both ranks, CPU seconds): {summary['cpu_work_efficiency']:.2f}")
    return rows, summary


def bench_cuda(args, samples: int, rounds: int) -> tuple[list, dict]:
    model, x = setup("cuda")
    predictive(model, x, WARM_SAMPLES, seed=0, chunk_seeds=True)
    plain = [time_call(lambda: predictive(model, x, samples, seed=0, chunk_seeds=True), "cuda")[0]
             for _ in range(rounds)]
    nccl = [run_ranks(1, args.threads, samples, "nccl") for _ in range(rounds)]
    a, b = statistics.median(plain), statistics.median(r["seconds"] for r in nccl)
    rows = [["1 process, no group", f"{a:.3f} s", f"{a / samples * 1e6:.3f} us", ""],
            ["NCCL group of 1", f"{b:.3f} s", f"{b / samples * 1e6:.3f} us", ""]]
    return rows, {"samples": samples, "rounds": rounds, "median_s": {"plain": a, "nccl_world1": b},
                  "overhead": b / a - 1,
                  "merge_gather_seconds_median": statistics.median(r["gather_seconds"] for r in nccl)}


def main(argv=None) -> None:
    if "BENCH_DISTRIBUTED" in os.environ:
        worker()
        return
    args = harness.parse_args(__doc__, argv)
    if not harness.device_available(args.device):
        return
    samples = QUICK_SAMPLES if args.quick else SAMPLES
    rounds = args.rounds or (1 if args.quick else ROUNDS)
    started, (busy0, own0) = time.perf_counter(), harness.cpu_seconds()
    bench = bench_cuda if args.device == "cuda" else bench_cpu
    rows, summary = bench(args, samples, rounds)
    info = harness.machine_info(args)
    info["threads"] = "see the table (set per configuration)"
    busy1, own1 = harness.cpu_seconds()
    info["run_wall_seconds"] = round(time.perf_counter() - started, 1)
    # CPU time of this process's children (the ranks) is not in own: only the parent's.
    children = os.times()
    own = (own1 - own0) + children.children_user + children.children_system
    info["cpu_seconds_used_by_other_processes"] = round((busy1 - busy0) - own, 1)
    lines = [f"# `distributed` benchmark on {args.device}", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    lines += ["", f"## The seed article's prediction, {samples:,} samples on 300 points "
              f"(medians over {summary.get('medians_over', 'all rounds')} of {rounds})", "",
              harness.markdown_table(["configuration", "time", "per sample", "CPU time (all threads)"],
                                     rows), ""]
    if "others_cpu_seconds" in summary:
        t, o = summary["seconds"], summary["others_cpu_seconds"]
        lines += ["Every round (wall time; CPU seconds other processes used meanwhile):", "",
                  harness.markdown_table(
                      ["round", "1 process x 2 threads", "2 processes x 1 thread",
                       "1 process x 1 thread"],
                      [[i + 1] + [f"{t[k][i]:.3f} s ({o[k][i]:.2f})" for k in "abc"]
                       for i in range(rounds)]), ""]
    lines += [f"- {k}: {v:.4g}" if isinstance(v, float) else f"- {k}: {v}"
              for k, v in summary.items()
              if k not in ("seconds", "cpu_seconds", "others_cpu_seconds", "median_s")]
    markdown = "\n".join(lines) + "\n"
    print(markdown)
    harness.RESULTS_DIR.mkdir(exist_ok=True)
    stem = harness.RESULTS_DIR / f"distributed_{args.device}"
    label = f"Predictive, the seed article's network, {samples:,} samples, 300 points ({args.device})"
    measurements = [{"label": label, "sub_label": CONFIGURATIONS[key], "description": "median",
                     "median_s": value, "number_per_run": 1, "blocks": rounds}
                    for key, value in summary["median_s"].items()]
    header = ["configuration", "time", "per sample", "CPU time (all threads)"]
    stem.with_suffix(".json").write_text(json.dumps(
        {"suite": "distributed", "machine": info, "measurements": measurements,
         "tables": {"Configurations": [dict(zip(header, row)) for row in rows]},
         "results": summary}, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown)
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
