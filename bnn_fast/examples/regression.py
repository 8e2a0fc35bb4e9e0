"""Bayesian regression of a noisy quintic, the torchbnn demo, with 10,000 posterior samples.

Trains a 1-1000-1 Bayesian MLP on y = x^5 - 10x + 2U (U ~ Uniform(0, 1)) with MSE + 0.01 * KL,
then draws 10,000 weight samples on 300 test points in one :func:`bnn_fast.predictive`
call and saves a figure of the predicted mean, the mean +- 3 std band, the test points and the
true mean x^5 - 10x + 1::

    python -m bnn_fast.examples.regression         # saves regression.png in the current directory
    python -m bnn_fast.examples.regression --steps 500 --samples 1000 --out /tmp/fit.png

The model is the article's ``nn.Sequential``, passed through :func:`bnn_fast.fuse` (the one-line
opt-in that trains ``BayesLinear -> ReLU -> BayesLinear`` as one fused CPU operator; the same
modules, parameters and ``state_dict``); ``--no-fuse`` trains the ``nn.Sequential`` as it is, layer by
layer, as the article's code does with the import swapped. Prediction fuses either way.

Needs matplotlib (``pip install bnn-fast[examples]``).
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn
from tqdm.auto import tqdm

import bnn_fast as bnn
from bnn_fast.estimators import ESTIMATORS
from bnn_fast.predictive import PredictiveResult, predictive


@dataclass
class Run:
    """What :func:`main` did: the training loss of every step, the timings and the figure."""

    losses: list[float]
    train_seconds: float
    predict_seconds: float
    figure: Path


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bnn_fast.examples.regression",
        description="Fit a Bayesian MLP to a noisy quintic and plot its posterior predictive.",
    )
    parser.add_argument("--steps", type=int, default=2000, help="training steps (default: 2000)")
    parser.add_argument("--samples", type=int, default=10_000,
                        help="posterior samples for the prediction (default: 10000)")
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        default="cuda" if torch.cuda.is_available() else "cpu",
                        help="default: cuda if available, else cpu")
    parser.add_argument("--out", type=Path, default=Path("regression.png"),
                        help="where to save the figure (default: regression.png)")
    parser.add_argument("--seed", type=int, default=0, help="torch.manual_seed (default: 0)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument("--estimator", choices=ESTIMATORS, default="reparam",
                        help="how the Bayesian layers draw their noise: 'reparam' (torchbnn's "
                             "reparameterization: one weight sample per forward, shared by the "
                             "batch), 'local' (local reparameterization: a normal per output "
                             "element) or 'flipout' (one perturbation, sign-flipped per row); "
                             "default: reparam")
    parser.add_argument("--no-fuse", action="store_true",
                        help="train the nn.Sequential layer by layer, as the article's code does "
                             "with the import swapped (default: bnn_fast.fuse(model), which trains "
                             "BayesLinear -> ReLU -> BayesLinear as one fused CPU operator)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.samples < 1:
        parser.error(f"--samples must be >= 1, got {args.samples}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available")
    return args


def make_data(n: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """n points of y = x^5 - 10x + 2U on an even grid of [-2, 2]; x and y are [n, 1]."""
    x = torch.linspace(-2, 2, n)
    y = x.pow(5) - 10 * x + 2 * torch.rand(x.size())
    return x.unsqueeze(1).to(device), y.unsqueeze(1).to(device)


def make_model(estimator: str = "reparam") -> nn.Sequential:
    """The article's 1-1000-1 network; `estimator` is each Bayesian layer's (bnn_fast.estimators)."""
    return nn.Sequential(
        bnn.BayesLinear(prior_mu=0, prior_sigma=0.1, in_features=1, out_features=1000,
                        estimator=estimator),
        nn.ReLU(),
        bnn.BayesLinear(prior_mu=0, prior_sigma=0.1, in_features=1000, out_features=1,
                        estimator=estimator),
    )


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int,
          progress: bool) -> list[float]:
    """Adam on MSE + 0.01 * KL (mean over the Bayesian parameters); returns each step's loss."""
    mse_loss = nn.MSELoss()
    kl_loss = bnn.BKLLoss(reduction="mean", last_layer_only=False)
    kl_weight = 0.01
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    costs = []
    for _ in tqdm(range(steps), desc="training", unit="step", disable=not progress):
        cost = mse_loss(model(x), y) + kl_weight * kl_loss(model)
        optimizer.zero_grad()
        cost.backward()
        optimizer.step()
        costs.append(cost.detach())
    # One transfer at the end: .item() every step would synchronize a GPU every step.
    return torch.stack(costs).flatten().tolist()


def plot(x_test: torch.Tensor, y_test: torch.Tensor, result: PredictiveResult, out: Path) -> None:
    """The article's figure: mean, mean +- 3 std, test points and the true mean function."""
    x = x_test[:, 0].cpu().numpy()
    mean = result.mean[:, 0].cpu().numpy()
    std = result.std[:, 0].cpu().numpy()
    fig = Figure(figsize=(10, 8))
    FigureCanvasAgg(fig)  # render with Agg, whatever pyplot's backend is
    ax = fig.add_subplot()
    ax.plot(x, mean, color="navy", lw=3, label="Predicted mean")
    ax.fill_between(x, mean - 3 * std, mean + 3 * std, color="navy", alpha=0.2,
                    label="99.7% interval")
    ax.scatter(x, y_test[:, 0].cpu().numpy(), color="darkorange", s=8, label="Test set")
    ax.plot(x, x**5 - 10 * x + 1, color="green", label=r"True function $x^5 - 10x + 1$")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title(f"Bayesian MLP: posterior predictive from {result.n_samples:,} weight samples")
    ax.legend()
    fig.savefig(out, dpi=100)


def _synchronize(device: str) -> None:
    # CUDA kernels run asynchronously: wait for them before reading the clock.
    if device == "cuda":
        torch.cuda.synchronize()


def main(argv: Optional[Sequence[str]] = None) -> Run:
    args = parse_args(argv)
    if args.device == "cpu":
        # Reuse freed CPU memory instead of paying page faults for the activations on every
        # training step and sample chunk (see bnn_fast.utils.retain_cpu_memory).
        bnn.utils.retain_cpu_memory()
    torch.manual_seed(args.seed)
    progress = not args.no_progress
    x, y = make_data(500, args.device)
    model = make_model(args.estimator).to(args.device)
    if not args.no_fuse:
        model = bnn.fuse(model)
    # Whether the fused operator will train it (CPU, reparam; see bnn_fast.fusion).
    fused = type(model) is bnn.FusedSequential and bnn.fusion.plan(model, x, grad=True) is not None
    print(f"{bnn.backend()}\ndevice: {args.device}, estimator: {args.estimator}, "
          f"fused training: {'yes' if fused else 'no'}")
    start = time.perf_counter()
    losses = train(model, x, y, args.steps, progress)
    _synchronize(args.device)
    train_seconds = time.perf_counter() - start
    print(f"training: {args.steps} steps in {train_seconds:.2f} s "
          f"(loss {losses[0]:.2f} -> {losses[-1]:.2f})")

    x_test, y_test = make_data(300, args.device)
    start = time.perf_counter()
    result = predictive(model, x_test, args.samples, progress=progress)
    _synchronize(args.device)
    predict_seconds = time.perf_counter() - start
    print(f"prediction: {args.samples} samples on {len(x_test)} points in {predict_seconds:.2f} s "
          f"(chunks of {result.chunk_size} samples)")

    plot(x_test, y_test, result, args.out)
    figure = args.out.resolve()
    print(f"figure: {figure}")
    return Run(losses, train_seconds, predict_seconds, figure)


if __name__ == "__main__":
    main()
