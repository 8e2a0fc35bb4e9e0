"""Small models' training steps: bnn_fast and torchbnn against the deterministic network.

Usage: python -m benchmarks.bench_small_models [--device cpu|cuda] [--quick] [--threads N]

A small Bayesian model's step is mostly fixed costs: Python per layer, autograd nodes, the KL
over many small tensors, the optimizer over twice the parameters. Its floor is the same network
built of nn.Linear / nn.Conv2d (no noise, no KL): a drop-in Bayesian layer shares that step's
loss, backward and optimizer work, and adds to them. Each model's step is timed for bnn_fast
(the drop-in, `import bnn_fast as bnn`), torchbnn and the deterministic network, all three in one
run, and reported as a multiple of the deterministic step:

- mlp: 4-128-128-3 classifier (ReLU), batch 32, cross-entropy + 0.01 * BKLLoss (an Iris-sized
  classifier);
- article: the seed article's 1-1000-1 regressor (ReLU), batch 500, MSE + 0.01 * BKLLoss;
- cnn: conv(1->8, 3x3) - ReLU - maxpool - conv(8->16, 3x3) - ReLU - maxpool - linear(400->10)
  on 1x28x28 images, batch 32, cross-entropy + 0.01 * BKLLoss.

Every step is `zero_grad`, forward, loss, backward and one Adam step (lr 1e-3). The nine cases
run in interleaved rounds (ROUNDS rounds of STEPS_PER_ROUND steps each, after an untimed round;
median over the rounds), so that a drift of the machine falls on every case alike.
Targets (CPU): bnn_fast's step within 1.3x of the deterministic one, and faster than torchbnn's.
"""
from __future__ import annotations

import torch
import torchbnn
from torch import nn

import bnn_fast

from . import harness

KL_WEIGHT = 0.01
ROUNDS, STEPS_PER_ROUND = 7, 100


def mlp(lib):
    if lib is None:
        return nn.Sequential(nn.Linear(4, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 3))
    return nn.Sequential(lib.BayesLinear(0, 0.1, 4, 128), nn.ReLU(), lib.BayesLinear(0, 0.1, 128, 128), nn.ReLU(),
                         lib.BayesLinear(0, 0.1, 128, 3))


def article(lib):
    if lib is None:
        return nn.Sequential(nn.Linear(1, 1000), nn.ReLU(), nn.Linear(1000, 1))
    return nn.Sequential(lib.BayesLinear(0, 0.1, 1, 1000), nn.ReLU(), lib.BayesLinear(0, 0.1, 1000, 1))


def cnn(lib):
    conv = nn.Conv2d if lib is None else (lambda *a: lib.BayesConv2d(0, 0.1, *a))
    linear = nn.Linear if lib is None else (lambda *a: lib.BayesLinear(0, 0.1, *a))
    return nn.Sequential(conv(1, 8, 3), nn.ReLU(), nn.MaxPool2d(2), conv(8, 16, 3), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), linear(16 * 5 * 5, 10))


# name: (builder, input shape, target maker, loss)
MODELS = {
    "mlp 4-128-128-3, batch 32": (mlp, (32, 4), lambda g: torch.randint(0, 3, (32,), generator=g), nn.CrossEntropyLoss()),
    "article 1-1000-1, batch 500": (article, (500, 1), lambda g: torch.randn(500, 1, generator=g), nn.MSELoss()),
    "cnn 28x28, batch 32": (cnn, (32, 1, 28, 28), lambda g: torch.randint(0, 10, (32,), generator=g),
                            nn.CrossEntropyLoss()),
}

LIBRARIES = {"bnn_fast": bnn_fast, "torchbnn": torchbnn, "deterministic": None}


def training_step(lib, build, shape, make_target, loss_fn, device):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = build(lib).to(device)
    x = torch.randn(shape, generator=g).to(device)
    y = make_target(g).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    kl_loss = lib.BKLLoss(reduction="mean", last_layer_only=False) if lib is not None else None

    def step():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        if kl_loss is not None:
            loss = loss + KL_WEIGHT * kl_loss(model)
        loss.backward()
        opt.step()
        return loss

    return step


def main(argv=None):
    args = harness.parse_args(__doc__, argv)
    if not harness.device_available(args.device):
        return
    runner = harness.Runner("small_models", args)
    device = torch.device(args.device)
    cases = []
    for model_name, (build, shape, make_target, loss_fn) in MODELS.items():
        for lib_name, lib in LIBRARIES.items():
            cases.append(harness.Case("training step", lib_name, model_name,
                                      training_step(lib, build, shape, make_target, loss_fn, device)))
    runner.measure_interleaved(cases, 2 if args.quick else ROUNDS, number=10 if args.quick else STEPS_PER_ROUND)
    rows = []
    for model_name in MODELS:
        floor = runner.median("training step", "deterministic", model_name)
        ours = runner.median("training step", "bnn_fast", model_name)
        theirs = runner.median("training step", "torchbnn", model_name)
        rows.append([model_name, harness.format_time(floor), f"{ours / floor:.2f}x", f"{theirs / floor:.2f}x",
                     f"{theirs / ours:.2f}x"])
        runner.check(f"{model_name}: bnn_fast step / deterministic step", ours / floor, "<=", 1.3)
        runner.check(f"{model_name}: torchbnn step / bnn_fast step", theirs / ours, ">=", 1.0)
    runner.add_table("Training step as a multiple of the deterministic network's (same run)",
                     ["model", "deterministic step", "bnn_fast", "torchbnn", "bnn_fast speedup vs torchbnn"], rows)
    runner.finish()


if __name__ == "__main__":
    main()
