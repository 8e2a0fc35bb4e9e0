"""The seed article's training step taken apart: where its milliseconds go, per library.

Usage: python -m benchmarks.train_step_parts

For bnn_fast (as a drop-in, and with the one-line opt-in ``model = bnn_fast.fuse(model)``, which
runs the whole network as one fused operator forward and backward), torchbnn and the
deterministic network of the same shapes (nn.Linear layers, MSE only: the floor of a drop-in
Bayesian layer), milliseconds per call of
- fwd_nograd: the cost (MSE + 0.01 * KL) under torch.no_grad;
- fwd: the same with autograd recording;
- fwd_bwd: forward, zero_grad and backward;
- step: the whole training step (fwd_bwd and Adam's step);
- kl_fwd_bwd: 0.01 * KL alone, forward, zero_grad and backward (Bayesian libraries only);
- adam: Adam's step alone.
Five rounds of 200 calls of each (after 20 untimed), all cases alternating; medians of the
rounds. Every library runs under bnn_fast.utils.retain_cpu_memory(), as in train_step_ab.
"""
import statistics
import time

import torch
import torch.nn as nn
import torchbnn

import bnn_fast

ROUNDS, CALLS, WARMUP = 5, 200, 20


def cases(lib, x, y, fuse=False):
    torch.manual_seed(0)
    mse = nn.MSELoss()
    if lib is None:
        model = nn.Sequential(nn.Linear(1, 1000), nn.ReLU(), nn.Linear(1000, 1))

        def cost():
            return mse(model(x), y)
    else:
        model = nn.Sequential(lib.BayesLinear(0, 0.1, 1, 1000), nn.ReLU(), lib.BayesLinear(0, 0.1, 1000, 1))
        if fuse:
            model = lib.fuse(model)
        kl = lib.BKLLoss(reduction="mean", last_layer_only=False)

        def cost():
            return mse(model(x), y) + 0.01 * kl(model)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)

    def fwd_nograd():
        with torch.no_grad():
            cost()

    def fwd_bwd():
        c = cost()
        opt.zero_grad()
        c.backward()

    def step():
        fwd_bwd()
        opt.step()

    out = dict(fwd_nograd=fwd_nograd, fwd=cost, fwd_bwd=fwd_bwd, step=step)
    if lib is not None:
        def kl_fwd_bwd():
            c = 0.01 * kl(model)
            opt.zero_grad()
            c.backward()
        out["kl_fwd_bwd"] = kl_fwd_bwd
    fwd_bwd()  # Adam's state and every .grad exist before adam is timed alone
    out["adam"] = opt.step
    return out


def main():
    torch.set_num_threads(2)
    bnn_fast.utils.retain_cpu_memory()
    torch.manual_seed(0)
    x = torch.linspace(-2, 2, 500).unsqueeze(1)
    y = x.pow(5) - 10 * x + 2 * torch.rand(x.size())
    libs = {"bnn_fast": cases(bnn_fast, x, y), "bnn_fast fuse()": cases(bnn_fast, x, y, fuse=True),
            "torchbnn": cases(torchbnn, x, y), "nn.Linear": cases(None, x, y)}
    times = {}
    for _ in range(ROUNDS):
        for lib, fns in libs.items():
            for name, fn in fns.items():
                for _ in range(WARMUP):
                    fn()
                start = time.perf_counter()
                for _ in range(CALLS):
                    fn()
                times.setdefault((lib, name), []).append((time.perf_counter() - start) / CALLS * 1e3)
    names = list(libs["bnn_fast"])
    print("ms per call (median of rounds):", " | ".join(libs))
    for name in names:
        row = [f"{statistics.median(times[(lib, name)]):.3f}" if (lib, name) in times else "-" for lib in libs]
        print(f"{name:11s}", " | ".join(row))


if __name__ == "__main__":
    main()
