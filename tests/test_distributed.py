"""bnn_fast on torch.distributed: 2-process gloo runs on 127.0.0.1 against one process.

Two ranks of tests/distributed_worker.py start once (a module fixture) and the tests compare what
they saved with one process; the torchrun example runs as its own 2-rank job. Bounded in time twice: the collectives' own
timeout (40 s, in the worker) and this file's limit on the processes (kills them and fails).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import bnn_fast
from bnn_fast import _sketch
from bnn_fast.predictive import predictive, predictive_classification

import distributed_worker as worker

ROOT = Path(__file__).resolve().parent.parent
LIMIT_S = 90  # both ranks, start-up included

pytestmark = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                       reason="needs torch.distributed with gloo"),
    pytest.mark.skipif(not bnn_fast._ops.extension_loaded(), reason="needs the compiled extension"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(scenario: str, out: Path, world: int = 2) -> list[dict]:
    """Starts `world` ranks of the worker on 127.0.0.1; returns what each saved."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               WORLD_SIZE=str(world), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    logs = [open(out / f"rank{r}.log", "w+") for r in range(world)]
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "distributed_worker.py"),
                               scenario, str(out)], env=dict(env, RANK=str(r)), cwd=out,
                              stdout=logs[r], stderr=subprocess.STDOUT) for r in range(world)]
    deadline = time.monotonic() + LIMIT_S
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
    text = []
    for r, log in enumerate(logs):
        log.seek(0)
        text.append(f"--- rank {r} (exit {procs[r].returncode}) ---\n{log.read()[-3000:]}")
        log.close()
    if any(p.returncode != 0 for p in procs):
        pytest.fail(f"{scenario}: a rank failed or ran past {LIMIT_S} s\n" + "\n".join(text))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    # Prediction and training in one group: one start-up of the two ranks.
    return run_ranks("all", tmp_path_factory.mktemp("ranks"))


@pytest.fixture
def predicted(ranks):
    return ranks


@pytest.fixture
def trained(ranks):
    return ranks


def one_process(**kwargs):
    return predictive(worker.regression_model(), worker.X, chunk_seeds=True, **kwargs)


def assert_float64_close(a, b):
    # float64 summation order only: the samples are the same.
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Prediction


@pytest.mark.parametrize("name", ["fixed_chunks", "auto_chunks", "one_chunk_rank0_idle"])
def test_two_ranks_give_the_one_process_result(predicted, name):
    kwargs = dict(dict(worker.CASES)[name])
    alone = one_process(**kwargs)
    for rank in predicted:
        r = rank[name]
        assert r.chunk_size == alone.chunk_size and r.n_samples == alone.n_samples
        assert_float64_close(r.mean, alone.mean)
        assert_float64_close(r.std, alone.std)
        if alone.quantiles is not None:
            assert r.quantile_method == "exact"
            assert torch.equal(r.quantiles, alone.quantiles)  # the same samples, gathered
        if alone.samples is not None:
            assert torch.equal(r.samples, alone.samples)


def test_chunk_seeds_make_one_process_independent_of_the_thread_count():
    kwargs = dict(n_samples=40, chunk_size=6, seed=1)
    a = one_process(**kwargs)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        b = one_process(**kwargs)
    finally:
        torch.set_num_threads(threads)
    assert_float64_close(a.mean, b.mean)


def test_sketch_quantiles_are_within_their_documented_rank_error(predicted):
    kwargs = dict(dict(worker.CASES)["sketch"])
    q = torch.tensor(kwargs.pop("quantiles"), dtype=torch.float64)
    kwargs.pop("memory_budget_mb")
    samples = one_process(return_samples=True, **kwargs).samples  # [S, N, 1]
    n = samples.shape[0]
    r0, r1 = (rank["sketch"] for rank in predicted)
    assert r0.quantile_method == "sketch" and torch.equal(r0.quantiles, r1.quantiles)
    assert 0 < r0.quantile_rank_error < 0.05
    e = r0.quantile_rank_error * n
    for i, level in enumerate(q.tolist()):
        v = r0.quantiles[i]  # [N, 1]
        below = (samples < v).sum(0)
        at_most = (samples <= v).sum(0)
        assert bool((below < level * n + e).all()) and bool((at_most >= level * n - e).all())
    # Mean and std do not depend on the quantile method.
    alone = one_process(**kwargs)
    assert_float64_close(r0.mean, alone.mean)


def test_sketch_bound_holds_on_one_stream():
    torch.manual_seed(0)
    data = torch.randn(5000, 3).double() ** 3
    sketch = _sketch.QuantileSketch(64)
    for chunk in data.split(37):
        sketch.add(chunk)
    values, weights = sketch.summary()
    assert weights.sum() == 5000 and sketch.rank_error > 0
    q = torch.tensor([0.01, 0.25, 0.5, 0.99], dtype=torch.float64)
    got = _sketch.query(values, weights, q)
    e = sketch.rank_error
    assert e <= 5000 * (5000 // 64).bit_length() / (2 * 64)  # the documented bound
    for i, level in enumerate(q.tolist()):
        assert bool(((data < got[i]).sum(0) < level * 5000 + e).all())
        assert bool(((data <= got[i]).sum(0) >= level * 5000 - e).all())


def test_only_rank_0_receives_the_result_on_request(predicted):
    alone = one_process(n_samples=40, chunk_size=7, seed=1)
    assert predicted[1]["rank0_only"] is None
    assert_float64_close(predicted[0]["rank0_only"].mean, alone.mean)


def test_classification_matches_one_process(predicted):
    alone = predictive_classification(worker.classifier(), worker.X, 90, chunk_size=8, seed=4,
                                      chunk_seeds=True)
    for rank in predicted:
        r = rank["classification"]
        for field in ("probs", "entropy", "expected_entropy", "mutual_information"):
            assert_float64_close(getattr(r, field), getattr(alone, field))


def test_plain_passes_drawing_from_torch_generators_match_too(predicted):
    alone = predictive(worker.Dropout(), worker.X, 30, chunk_size=4, seed=6, chunk_seeds=True)
    for rank in predicted:
        assert_float64_close(rank["dropout"].mean, alone.mean)
        assert_float64_close(rank["dropout"].std, alone.std)


def test_a_group_of_one_is_one_process(predicted):
    alone = one_process(n_samples=50, chunk_size=6, seed=9)
    assert_float64_close(predicted[0]["group_of_one"].mean, alone.mean)
    assert_float64_close(predicted[0]["group_of_one"].std, alone.std)


def test_failures_raise_on_every_rank_and_nothing_hangs(predicted):
    r0, r1 = predicted
    assert (r0["bad_on_rank1"], r1["bad_on_rank1"]) == ("RankFailed", "ValueError")
    assert (r0["mismatch"], r1["mismatch"]) == ("ValueError", "ValueError")
    assert (r0["model_fails_on_rank1"], r1["model_fails_on_rank1"]) == ("RankFailed", "RuntimeError")
    # The group still works afterwards.
    assert_float64_close(r0["after_failures"].mean, one_process(n_samples=20, chunk_size=3, seed=7).mean)


def test_group_arguments_are_checked_without_a_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        predictive(worker.regression_model(), worker.X, 10, group="default")
    with pytest.raises(ValueError, match="group must be"):
        predictive(worker.regression_model(), worker.X, 10, group="world")
    with pytest.raises(TypeError, match="group must be"):
        predictive(worker.regression_model(), worker.X, 10, group=3)
    with pytest.raises(TypeError, match="all_ranks must be a bool"):
        predictive(worker.regression_model(), worker.X, 10, all_ranks=1)
    with pytest.raises(TypeError, match="chunk_seeds must be"):
        predictive(worker.regression_model(), worker.X, 10, chunk_seeds="yes")


# ----------------------------------------------------------------------------------------------
# Data-parallel training


def test_ddp_training_keeps_the_ranks_identical_and_the_loss_falls(trained):
    r0, r1 = trained
    for key, value in r0["params"].items():
        assert torch.equal(value, r1["params"][key]), key
    for rank in trained:
        first, last = sum(rank["losses"][:5]) / 5, sum(rank["losses"][-5:]) / 5
        assert last < 0.5 * first, rank["losses"]


def test_ranks_draw_the_same_noise_unless_independent_noise_is_on(trained):
    r0, r1 = trained
    assert torch.equal(r0["shared"], r1["shared"])
    assert not torch.equal(r0["own"], r1["own"])
    assert torch.equal(r0["again"], r0["shared"]) and torch.equal(r1["again"], r1["shared"])


# ----------------------------------------------------------------------------------------------
# The torchrun example


def test_torchrun_example_trains_predicts_and_plots(tmp_path):
    figure = tmp_path / "distributed.png"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
               "-m", "bnn_fast.examples.distributed", "--steps", "20", "--samples", "3000",
               "--no-progress", "--out", str(figure)]
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    # A process group of its own, so that a timeout ends torchrun's ranks too, not only torchrun.
    proc = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=os.setpgrp)
    try:
        output, _ = proc.communicate(timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"the example ran past {LIMIT_S} s:\n{output}")
    assert proc.returncode == 0, output
    assert "world size 2 (gloo" in output and "prediction: 3,000 samples" in output
    assert figure.stat().st_size > 10_000
