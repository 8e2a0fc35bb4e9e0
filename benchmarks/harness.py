"""The runner shared by the benchmark suites, built on torch.utils.benchmark.

A suite describes what to time as `Case`s and hands them to a `Runner`, which times each with
`Timer.blocked_autorange`, keeps the median and IQR, and at the end prints a `Compare` table plus
Markdown tables and writes results/<suite>_<device>.json and .md. Ratios (speedups, targets) are
only ever computed from measurements of the same run: a ratio of numbers taken at different times
on a noisy machine would mean little.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.utils.benchmark as benchmark

import bnn_fast

RESULTS_DIR = Path(__file__).resolve().parent / "results"
FULL_MIN_RUN_TIME = 1.0  # seconds of timed runs per case
QUICK_MIN_RUN_TIME = 0.05  # --quick: enough to check that a suite runs end to end, not to compare
MIB = 2**20


@dataclass
class Case:
    """One statement to time.

    label: the table it belongs to; sub_label: its row (the implementation); description: its
    column (the configuration); stmt: a closure doing one iteration of the work.
    """

    label: str
    sub_label: str
    description: str
    stmt: Callable[[], object]


def parse_args(doc: str, argv=None) -> argparse.Namespace:
    """The command line every suite takes."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="short runs: a smoke test, the numbers are noisy")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: 2)")
    parser.add_argument("--min-run-time", type=float, default=None, metavar="SECONDS",
                        help="seconds of timed runs per case, for every suite (default: each suite's own; "
                             "a GPU's timings are steady enough for 0.2 where a lease is short)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed rounds of the interleaved cases (default: each suite's own)")
    parser.add_argument("--train-steps", type=int, default=None,
                        help="bench_predictive: training steps (default: 2000, or 500 with --quick)")
    args = parser.parse_args(argv)
    if args.train_steps is not None and args.train_steps < 1:
        parser.error("--train-steps must be at least 1")
    if args.min_run_time is not None and args.min_run_time <= 0:
        parser.error("--min-run-time must be positive")
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def device_available(device: str) -> bool:
    """Whether `device` can be benchmarked here; prints why not."""
    if device == "cuda" and not torch.cuda.is_available():
        print("skipping: --device cuda was asked for but no CUDA device is available")
        return False
    return True


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds all processes have been busy since boot, CPU seconds this process has used);
    the first is nan where /proc/stat cannot be read."""
    own = os.times()
    try:
        with open("/proc/stat") as f:
            # cpu  user nice system idle iowait irq softirq steal ...
            fields = [int(v) for v in f.readline().split()[1:9]]
        busy = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        busy = float("nan")
    return busy, own.user + own.system


def cpu_simd_level() -> str:
    """The widest vector path bnn_fast's CPU kernels take here: 'avx512', 'avx2' or 'scalar'.
    The rule of csrc/cpu/simd.h (simd_level): AVX-512F, else AVX2 with FMA, else scalar, capped
    by BNN_FAST_CPU_SIMD ('0': scalar, 'avx2': at most AVX2)."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    cap = os.environ.get("BNN_FAST_CPU_SIMD")
    if not {"avx2", "fma"} <= flags or cap == "0":
        return "scalar"
    if "avx512f" not in flags or cap == "avx2":
        return "avx2"
    return "avx512"


def git_commit() -> tuple[str, bool | None]:
    """(short hash of HEAD, whether tracked files differ from it) for the tree the benchmarks run
    from; ('unknown', None) outside a git tree, unless BNN_FAST_COMMIT names the commit (a copy
    of the tree without .git, as on a lent GPU machine)."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10)
        if head.returncode == 0:
            # The results folder is left out: run_all rewrites it while it runs.
            status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                     ":!benchmarks/results"], cwd=root,
                                    capture_output=True, text=True, timeout=30)
            return head.stdout.strip(), bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("BNN_FAST_COMMIT", "unknown"), None


def machine_info(args: argparse.Namespace) -> dict:
    """Where and what was measured; benchmarks/report.py requires report.REQUIRED_METADATA."""
    commit, dirty = git_commit()
    info = {
        "cpu": cpu_model(),
        # bnn_fast's own vector path (cpu/simd.h), and torch's reading of the CPU's vector ISA.
        "cpu_simd": cpu_simd_level(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "BNN_FAST_CPU_SIMD": os.environ.get("BNN_FAST_CPU_SIMD", "(unset)"),
        "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "bnn_fast_backend": str(bnn_fast.backend()),
        "commit": commit,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": args.device,
    }
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    if dirty is not None:
        info["uncommitted_changes"] = dirty
    return info


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes held by the allocator during one call of `fn`, above what was held before it.

    CUDA: the caching allocator's own peak counter. CPU: torch has no CPU allocator statistics,
    so the call runs under torch.profiler with profile_memory=True and the peak is the running sum
    of its allocation and free events in time order. The raw events are read rather than
    prof.events(), which folds allocations made inside an operator into that operator and so hides
    an operator's transient peak. Memory not taken from PyTorch's allocator (e.g. BLAS packing
    buffers) is not seen.
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        e for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    running = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        running += e.nbytes()  # negative for a free
        peak = max(peak, running)
    return peak


def mmap_large_cpu_blocks(threshold: int = 1 << 20) -> bool:
    """glibc: serve every CPU allocation of `threshold` bytes or more with its own mmap (a fixed
    threshold; by default glibc raises it as blocks are freed and serves them from the heap).
    Used around profiler memory measurements, where heap fragmentation grew the process without
    bound. Returns False where there is no glibc mallopt."""
    from bnn_fast import utils

    return utils._mallopt(utils._M_MMAP_THRESHOLD, threshold)


def save_figure(fig, name: str) -> Path:
    """Saves a matplotlib figure as results/<name>.png, closes it, and returns the path."""
    import matplotlib.pyplot as plt

    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{name}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")
    return path


def _unit(seconds: float) -> tuple[float, str]:
    if seconds >= 1:
        return 1.0, "s"
    if seconds >= 1e-3:
        return 1e3, "ms"
    return 1e6, "us"


def format_time(median: float, iqr: float | None = None) -> str:
    """'1.23 ms', or '1.23 ± 0.04 ms' with the IQR in the median's unit."""
    scale, unit = _unit(median)
    if iqr is None:
        return f"{median * scale:.3g} {unit}"
    return f"{median * scale:.3g} ± {iqr * scale:.2g} {unit}"


def markdown_table(header: list, rows: list[list]) -> str:
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    return "\n".join([line(header), "|" + " --- |" * len(header)] + [line(row) for row in rows])


def _unique(values):
    return list(dict.fromkeys(values))


WARM_UP_CALLS = 3
WARM_UP_MAX_SECONDS = 5.0


def warm_up(stmt, seconds: float) -> None:
    """Calls stmt until it has run WARM_UP_CALLS times and `seconds` have passed (at most
    WARM_UP_MAX_SECONDS, and at least once). The first calls of a case can be several times slower
    than the rest for reasons outside the code measured: on the development VM, bnn_fast's
    4096x4096 training step took 170-190 ms for about a second after the six libraries' 4096x4096
    layers were allocated (the kernel finding huge pages for its fresh buffers), then 55-80 ms;
    without a warm-up that case's median depended on which case ran first."""
    start = time.perf_counter()
    calls = 0
    while True:
        stmt()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= WARM_UP_MAX_SECONDS or (calls >= WARM_UP_CALLS and elapsed >= seconds):
            return


class Runner:
    """Times cases, collects extra tables and target checks, and writes the results files."""

    def __init__(self, suite: str, args: argparse.Namespace, min_run_time: float = FULL_MIN_RUN_TIME):
        """min_run_time: seconds of timed runs per case in a full run (--quick overrides it)."""
        self.suite = suite
        self.args = args
        self.device = torch.device(args.device)
        if args.min_run_time is not None:
            self.min_run_time = args.min_run_time
        else:
            self.min_run_time = QUICK_MIN_RUN_TIME if args.quick else min_run_time
        self.measurements: list[benchmark.Measurement] = []
        self.tables: list[tuple[str, list, list[list]]] = []  # (title, header, rows)
        self.targets: list[dict] = []
        self.started = time.perf_counter(), cpu_seconds()
        torch.set_num_threads(args.threads)

    def measure_interleaved(self, cases: list[Case], rounds: int, number: int = 1) -> None:
        """Times each case once per round (`number` calls, averaged), the cases alternating within
        a round, and keeps the `rounds` times of each (median over rounds). For cases compared by
        a ratio, where a slow drift of the machine would otherwise fall on whichever case ran
        last; one untimed round first warms every case up. --rounds overrides `rounds`."""
        rounds = self.args.rounds or rounds
        timers = [
            benchmark.Timer(stmt="stmt()", globals={"stmt": c.stmt}, label=c.label, sub_label=c.sub_label,
                            description=c.description, num_threads=self.args.threads)
            for c in cases
        ]
        for case in cases:
            case.stmt()
        runs = [[] for _ in cases]
        for _ in range(rounds):
            for timer, times in zip(timers, runs):
                times.append(timer.timeit(number=number))
        for case, times in zip(cases, runs):
            (m,) = benchmark.Measurement.merge(times)
            self.measurements.append(m)
            print(f"  {case.label} | {case.sub_label} | {case.description}: {format_time(m.median, m.iqr)}"
                  f" ({len(m.times)} interleaved runs)", flush=True)

    def measure(self, cases: list[Case]) -> None:
        for case in cases:
            warm_up(case.stmt, min(1.0, self.min_run_time))
            timer = benchmark.Timer(
                stmt="stmt()",
                globals={"stmt": case.stmt},
                label=case.label,
                sub_label=case.sub_label,
                description=case.description,
                num_threads=self.args.threads,
            )
            m = timer.blocked_autorange(min_run_time=self.min_run_time)
            self.measurements.append(m)
            print(
                f"  {case.label} | {case.sub_label} | {case.description}: {format_time(m.median, m.iqr)}"
                f" ({len(m.times)} blocks of {m.number_per_run})",
                flush=True,
            )

    def median(self, label: str, sub_label: str, description: str) -> float:
        for m in self.measurements:
            if (m.label, m.sub_label, m.description) == (label, sub_label, description):
                return m.median
        raise KeyError((label, sub_label, description))

    def ratio(self, label: str, description: str, numerator: str, denominator: str) -> float:
        """median(numerator) / median(denominator), both rows of one table and column."""
        return self.median(label, numerator, description) / self.median(label, denominator, description)

    def add_table(self, title: str, header: list, rows: list[list]) -> None:
        """An extra table (memory, sanity checks, ...) for the console, the JSON and the Markdown."""
        self.tables.append((title, header, rows))

    def check(self, target: str, value: float, op: str, threshold: float) -> None:
        """Record whether `value op threshold` holds (op: '>=' or '<=')."""
        met = value >= threshold if op == ">=" else value <= threshold
        self.targets.append({"target": target, "value": value, "op": op, "threshold": threshold, "met": met})

    def _speedups(self, baseline: str) -> list[dict]:
        rows = []
        for m in self.measurements:
            try:
                base = self.median(m.label, baseline, m.description)
            except KeyError:  # a table without the baseline row
                continue
            rows.append({"label": m.label, "description": m.description, "sub_label": m.sub_label,
                         "baseline": baseline, "speedup": base / m.median})
        return rows

    def _markdown(self, info: dict, baseline: str) -> str:
        speedups = {(s["label"], s["sub_label"], s["description"]): s["speedup"] for s in self._speedups(baseline)}
        parts = [f"# `{self.suite}` benchmark on {self.args.device}", ""]
        parts += [f"- {key}: {value}" for key, value in info.items()]
        parts.append(f"- min_run_time per case: {self.min_run_time} s{' (--quick)' if self.args.quick else ''}")
        if self.args.rounds:
            parts.append(f"- interleaved rounds: {self.args.rounds} (--rounds)")
        for label in _unique(m.label for m in self.measurements):
            ms = [m for m in self.measurements if m.label == label]
            columns = _unique(m.description for m in ms)
            rows = _unique(m.sub_label for m in ms)
            cells = {(m.sub_label, m.description): m for m in ms}
            parts += ["", f"## {label}", "", "Median ± IQR:", ""]
            parts.append(markdown_table(
                ["implementation"] + columns,
                [[r] + [format_time(cells[r, c].median, cells[r, c].iqr) if (r, c) in cells else "" for c in columns]
                 for r in rows],
            ))
            if any(key[0] == label for key in speedups):
                parts += ["", f"Speedup vs {baseline} ({baseline} median / this median, same run):", ""]
                parts.append(markdown_table(
                    ["implementation"] + columns,
                    [[r] + [f"{speedups[label, r, c]:.2f}x" if (label, r, c) in speedups else "" for c in columns]
                     for r in rows],
                ))
        for title, header, rows in self.tables:
            parts += ["", f"## {title}", "", markdown_table(header, rows)]
        if self.targets:
            parts += ["", "## Targets", ""]
            parts.append(markdown_table(
                ["target", "measured", "required", "met"],
                [[t["target"], f"{t['value']:.2f}x", f"{t['op']} {t['threshold']}x", "yes" if t["met"] else "NO"]
                 for t in self.targets],
            ))
        return "\n".join(parts) + "\n"

    def finish(self, baseline: str = "torchbnn") -> None:
        """Print the Compare table and the Markdown report; write the JSON and Markdown files."""
        # Untrimmed: trim_significant_figures rounds noisy rows to one digit.
        benchmark.Compare(self.measurements).print()
        info = machine_info(self.args)
        wall0, (busy0, own0) = self.started
        (busy1, own1) = cpu_seconds()
        info["run_wall_seconds"] = round(time.perf_counter() - wall0, 1)
        # Other processes on the same cores skew every number: this says whether the run was alone.
        info["cpu_seconds_used_by_other_processes"] = round((busy1 - busy0) - (own1 - own0), 1)
        markdown = self._markdown(info, baseline)
        print(markdown)
        result = {
            "suite": self.suite,
            "machine": info,
            "min_run_time_s": self.min_run_time,
            "quick": self.args.quick,
            "measurements": [
                {"label": m.label, "sub_label": m.sub_label, "description": m.description,
                 "median_s": m.median, "iqr_s": m.iqr, "mean_s": m.mean,
                 "blocks": len(m.times), "number_per_run": m.number_per_run}
                for m in self.measurements
            ],
            "speedups": self._speedups(baseline),
            "tables": {title: [dict(zip(header, row)) for row in rows] for title, header, rows in self.tables},
            "targets": self.targets,
        }
        RESULTS_DIR.mkdir(exist_ok=True)
        stem = RESULTS_DIR / f"{self.suite}_{self.args.device}"
        stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        stem.with_suffix(".md").write_text(markdown)
        print(f"wrote {stem}.json and {stem}.md")
