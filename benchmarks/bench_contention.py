"""The seed article's script as written, on a quiet and on a busy machine: torchbnn against bnn_fast.

Usage: python -m benchmarks.bench_contention [--quick] [--threads N] [--rounds R]

Users run on shared machines. This measures how much each library slows down when other
processes compete for the cores. Each measurement is a fresh process (`--child LIB`) that runs
the article's code as written, with only the import differing:

- training: 300 steps of the article's loop (the 1-1000-1 network, 500 points, Adam, MSE +
  0.01 * BKLLoss), after 20 untimed steps;
- prediction: the article's loop `np.array([model(x_test).data.numpy() for k in range(n)])` on
  300 points, grad mode on as written (n = 2,000 passes: a fifth of the article's 10,000, so a
  busy run stays short), after 20 untimed passes; also the process's peak resident memory and
  the resident memory the loop added per kept output (each output holds 1,200 bytes of data).

Under three loads: quiet, one busy process, two busy processes. A busy process is a pure-Python
spin loop pinned to nothing, started before the measurement and told to stop after a deadline
(it also stops itself at that deadline if this script dies). The libraries alternate within each
round; medians over the rounds. Slowdown = median under load / median quiet, per library; the
target is bnn_fast's slowdown no worse than torchbnn's under each load.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from . import harness

LIBRARIES = ("torchbnn", "bnn_fast")
LOADS = {"quiet": 0, "1 busy process": 1, "2 busy processes": 2}
TRAIN_STEPS, PREDICT_PASSES, WARM_UP = 300, 2000, 20

SPIN = "import sys, time\nend = time.time() + float(sys.argv[1])\nwhile time.time() < end:\n    pass\n"


def child(lib_name: str, threads: int, train_steps: int, passes: int) -> None:
    """The article's code with `import <lib_name> as bnn`; prints {"train_s", "predict_s",
    "peak_rss_mb", "rss_per_kept_output_kb"}."""
    import resource

    import numpy as np
    import torch
    import torch.nn as nn
    import torch.optim as optim

    bnn = __import__(lib_name)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = torch.linspace(-2, 2, 500)
    y = x.pow(5) - 10 * x.pow(1) + 2 * torch.rand(x.size())
    x, y = torch.unsqueeze(x, dim=1), torch.unsqueeze(y, dim=1)
    model = nn.Sequential(
        bnn.BayesLinear(prior_mu=0, prior_sigma=0.1, in_features=1, out_features=1000),
        nn.ReLU(),
        bnn.BayesLinear(prior_mu=0, prior_sigma=0.1, in_features=1000, out_features=1),
    )
    mse_loss = nn.MSELoss()
    kl_loss = bnn.BKLLoss(reduction="mean", last_layer_only=False)
    kl_weight = 0.01
    optimizer = optim.Adam(model.parameters(), lr=0.01)

    def train(steps):
        for _ in range(steps):
            pre = model(x)
            cost = mse_loss(pre, y) + kl_weight * kl_loss(model)
            optimizer.zero_grad()
            cost.backward()
            optimizer.step()

    train(WARM_UP)
    start = time.perf_counter()
    train(train_steps)
    train_s = time.perf_counter() - start

    x_test = torch.unsqueeze(torch.linspace(-2, 2, 300), dim=1)
    np.array([model(x_test).data.numpy() for k in range(WARM_UP)])

    def resident_bytes():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    rss_before = resident_bytes()
    start = time.perf_counter()
    kept = [model(x_test).data.numpy() for k in range(passes)]
    predict_s = time.perf_counter() - start
    rss_per_kept = (resident_bytes() - rss_before) / passes
    models_result = np.array(kept)
    assert models_result.shape == (passes, 300, 1)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"train_s": train_s, "predict_s": predict_s, "peak_rss_mb": peak_mb,
                      "rss_per_kept_output_kb": rss_per_kept / 1024}))


def run_child(lib: str, args) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_contention", "--child", lib, "--threads", str(args.threads),
           "--train-steps", str(args.train_steps), "--passes", str(args.passes)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout, cwd=root)
    if out.returncode != 0:
        raise RuntimeError(f"{lib} child failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(args) -> dict:
    """{(load, lib): [{"train_s", "predict_s"}, ...]}"""
    times = {(load, lib): [] for load in LOADS for lib in LIBRARIES}
    for load, n_busy in LOADS.items():
        # Deadline: every round's children at their child timeout, at most; killed at the end anyway.
        deadline = args.rounds * len(LIBRARIES) * args.child_timeout
        busy = [subprocess.Popen([sys.executable, "-c", SPIN, str(deadline)]) for _ in range(n_busy)]
        try:
            time.sleep(0.5 if n_busy else 0)
            for r in range(args.rounds):
                order = LIBRARIES if r % 2 == 0 else LIBRARIES[::-1]
                for lib in order:
                    t = run_child(lib, args)
                    times[load, lib].append(t)
                    print(f"  {load:17s} round {r + 1}: {lib:9s} train {t['train_s']:.2f} s, "
                          f"predict {t['predict_s']:.2f} s, peak RSS {t['peak_rss_mb']:.0f} MB, "
                          f"{t['rss_per_kept_output_kb']:.1f} KB per kept output", flush=True)
        finally:
            for p in busy:
                p.kill()
                p.wait()
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", choices=LIBRARIES, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="1 round, 50 steps, 300 passes: a smoke test")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in each child (default: 2)")
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds per load (default: 3)")
    parser.add_argument("--train-steps", type=int, default=TRAIN_STEPS)
    parser.add_argument("--passes", type=int, default=PREDICT_PASSES)
    parser.add_argument("--child-timeout", type=float, default=300.0, help="seconds one child may take")
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.threads, args.train_steps, args.passes)
        return
    if args.quick:
        args.rounds, args.train_steps, args.passes = 1, 50, 300
    wall0, (busy0, own0) = time.perf_counter(), harness.cpu_seconds()
    times = measure(args)

    measurements, rows, targets = [], [], []
    medians = {}
    for (load, lib), ts in times.items():
        for phase, label in (("train_s", f"Article training, {args.train_steps} steps"),
                             ("predict_s", f"Article prediction loop, {args.passes} passes")):
            values = [t[phase] for t in ts]
            medians[load, lib, phase] = statistics.median(values)
            q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
            measurements.append({"label": label, "sub_label": lib, "description": load,
                                 "median_s": medians[load, lib, phase], "iqr_s": q[2] - q[0],
                                 "mean_s": statistics.mean(values), "blocks": len(values), "number_per_run": 1})
    for load in list(LOADS)[1:]:
        for phase, name in (("train_s", "training"), ("predict_s", "prediction loop")):
            slow = {lib: medians[load, lib, phase] / medians["quiet", lib, phase] for lib in LIBRARIES}
            rows.append([f"{name}, {load}", f"{slow['bnn_fast']:.2f}x", f"{slow['torchbnn']:.2f}x",
                         f"{medians[load, 'torchbnn', phase] / medians[load, 'bnn_fast', phase]:.2f}x"])
            targets.append({"target": f"{name}, {load}: torchbnn's slowdown / bnn_fast's",
                            "value": slow["torchbnn"] / slow["bnn_fast"], "op": ">=", "threshold": 1.0,
                            "met": slow["torchbnn"] >= slow["bnn_fast"]})
    memory_header = ["library", "peak RSS (MB, median over rounds and loads)",
                     "resident memory added per kept output (KB, median)"]
    memory_rows = [[lib, f"{statistics.median(t['peak_rss_mb'] for load in LOADS for t in times[load, lib]):.0f}",
                    f"{statistics.median(t['rss_per_kept_output_kb'] for load in LOADS for t in times[load, lib]):.1f}"]
                   for lib in LIBRARIES]
    header = ["workload, load", "bnn_fast slowdown", "torchbnn slowdown", "bnn_fast speedup vs torchbnn (loaded)"]
    speedups = [{"label": m["label"], "description": m["description"], "sub_label": m["sub_label"],
                 "baseline": "torchbnn", "speedup": medians[m["description"], "torchbnn",
                                                           "train_s" if "training" in m["label"] else "predict_s"]
                 / m["median_s"]} for m in measurements]

    info = harness.machine_info(argparse.Namespace(device="cpu"))
    info["threads"] = args.threads
    busy1, own1 = harness.cpu_seconds()
    info["run_wall_seconds"] = round(time.perf_counter() - wall0, 1)
    result = {"suite": "contention", "machine": info, "quick": args.quick, "rounds": args.rounds,
              "measurements": measurements, "speedups": speedups,
              "tables": {"Slowdown under load (median loaded / median quiet, same run)":
                         [dict(zip(header, r)) for r in rows],
                         f"Memory of the prediction loop as written ({args.passes} kept outputs)":
                         [dict(zip(memory_header, r)) for r in memory_rows]},
              "targets": targets}
    lines = [f"# `contention` benchmark on cpu", ""] + [f"- {k}: {v}" for k, v in info.items()]
    lines += ["", "## Slowdown under load", "", harness.markdown_table(header, rows), ""]
    lines += ["## Memory of the prediction loop as written", "", harness.markdown_table(memory_header, memory_rows), ""]
    lines += ["## Medians", "", harness.markdown_table(
        ["workload", "library", "load", "median"],
        [[m["label"], m["sub_label"], m["description"], harness.format_time(m["median_s"], m["iqr_s"])]
         for m in measurements]), ""]
    markdown = "\n".join(lines)
    print(markdown)
    harness.RESULTS_DIR.mkdir(exist_ok=True)
    stem = harness.RESULTS_DIR / "contention_cpu"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown)
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
