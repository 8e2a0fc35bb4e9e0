"""Bayesian convolutional networks: a training step and a 1,000-sample prediction.

Usage: python -m benchmarks.bench_conv [--device cpu|cuda] [--quick] [--threads N] [--rounds R]

Two networks, each built five ways from the same constructor arguments:

- lenet: LeNet-5 on 1x28x28 images: conv(1->6, 5x5, pad 2) - ReLU - maxpool - conv(6->16, 5x5) -
  ReLU - maxpool - linear(400->120) - ReLU - linear(120->84) - ReLU - linear(84->10);
- resnet8: a small ResNet on 3x32x32 images: conv(3->16, 3x3) - BN - ReLU, three basic blocks
  (two 3x3 convs with BN, 16, 32 and 64 channels, strides 1, 2, 2, a 1x1 conv + BN shortcut where
  the shape changes), global average pooling, linear(64->10): 8 layers on the main path.

Implementations: bnn_fast (the drop-in layers: BayesConv2d, BayesBatchNorm2d, BayesLinear),
torchbnn 1.2 (the same three), bayesian-torch's Conv2dReparameterization / LinearReparameterization
and Conv2dFlipout / LinearFlipout (with torch.nn's BatchNorm2d: bayesian-torch has no Bayesian
batch norm; its layers return ``(out, kl)``, so a wrapper asks for the output alone and the KL
comes from ``get_kl_loss``), and the deterministic network (torch.nn layers, no KL).

a. Training step at batch 64 (bnn_fast also with its convolutions' "local" and "flipout"
   estimators, PyTorch compositions of two convolutions each): zero_grad, forward, cross-entropy + 0.01 * KL, backward, one Adam
   step (lr 1e-3). Timed in interleaved rounds (every implementation once per round, median over
   rounds). Peak memory of one step (harness.peak_memory: PyTorch's allocations), and the bytes
   autograd keeps for the backward (every tensor saved by the forward, once per storage,
   parameters excluded): the Bayesian layers' share of the peak is small next to the
   activations at batch 64, and this shows it.
b. Prediction from 1,000 weight samples on 64 images, no gradients, eval mode: bnn_fast's
   ``predictive`` (mean, std; S samples per batched call) against each library's loop of one
   forward pass per sample, stacked, then mean and std. The deterministic network's loop of the
   same 1,000 passes is the compute floor of any per-sample method.

Targets (issue 19, CPU): bnn_fast's training step at least as fast as torchbnn's with a lower
peak memory; the prediction at least 5x faster than torchbnn's loop.
--quick: 100 samples instead of 1,000, 2 rounds.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import torchbnn
from bayesian_torch.layers import (
    Conv2dFlipout, Conv2dReparameterization, LinearFlipout, LinearReparameterization,
)
from bayesian_torch.models.dnn_to_bnn import get_kl_loss
from torch import nn

import bnn_fast

from . import harness

PRIOR_MU, PRIOR_SIGMA = 0.0, 0.1
BATCH, KL_WEIGHT, LR = 64, 0.01, 1e-3
SAMPLES, QUICK_SAMPLES = 1000, 100
ROUNDS, QUICK_ROUNDS = 5, 2  # training steps (a fraction of a second each)
PREDICT_ROUNDS = 3  # predictions (seconds each)
TRAIN_STEPS_PER_ROUND = 10
PREDICT_TARGET = 5.0


class _DropKL(nn.Module):
    """A bayesian-torch layer whose forward returns the output alone (not ``(out, kl)``)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x, return_kl=False)


def kit(name):
    """(conv(in, out, k, stride, padding, bias), bn(channels), linear(in, out), kl(model) or None)."""
    if name == "deterministic":
        return (lambda i, o, k, s=1, p=0, bias=True: nn.Conv2d(i, o, k, s, p, bias=bias),
                nn.BatchNorm2d, nn.Linear, None)
    if name.startswith("bnn_fast") or name == "torchbnn":
        lib = torchbnn if name == "torchbnn" else bnn_fast
        kl = lib.BKLLoss(reduction="mean", last_layer_only=False)
        # "bnn_fast local" / "bnn_fast flipout": the convolutions' estimator (the linear layers
        # keep reparam, as the comparison is about the convolutions' PyTorch compositions).
        extra = {"estimator": name.split()[1]} if " " in name else {}
        return (lambda i, o, k, s=1, p=0, bias=True: lib.BayesConv2d(PRIOR_MU, PRIOR_SIGMA, i, o, k, s, p,
                                                                     bias=bias, **extra),
                functools.partial(lib.BayesBatchNorm2d, PRIOR_MU, PRIOR_SIGMA),
                functools.partial(lib.BayesLinear, PRIOR_MU, PRIOR_SIGMA), kl)
    conv_cls, linear_cls = {
        "bayesian-torch Reparameterization": (Conv2dReparameterization, LinearReparameterization),
        "bayesian-torch Flipout": (Conv2dFlipout, LinearFlipout),
    }[name]
    priors = dict(prior_mean=PRIOR_MU, prior_variance=PRIOR_SIGMA ** 2)

    def kl(model):
        # bayesian-torch's KL is summed; divide by the Bayesian parameter count as BKLLoss's mean.
        return get_kl_loss(model) / _n_bayes(model)

    return (lambda i, o, k, s=1, p=0, bias=True: _DropKL(conv_cls(i, o, k, s, p, bias=bias, **priors)),
            nn.BatchNorm2d, lambda i, o: _DropKL(linear_cls(i, o, **priors)), kl)


def _n_bayes(model):
    return sum(p.numel() for n, p in model.named_parameters() if "mu" in n)


def lenet(name):
    conv, _, linear, _ = kit(name)
    return nn.Sequential(
        conv(1, 6, 5, 1, 2), nn.ReLU(), nn.MaxPool2d(2), conv(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), linear(400, 120), nn.ReLU(), linear(120, 84), nn.ReLU(), linear(84, 10),
    )


class Block(nn.Module):
    def __init__(self, name, c_in, c_out, stride):
        super().__init__()
        conv, bn, _, _ = kit(name)
        self.body = nn.Sequential(conv(c_in, c_out, 3, stride, 1, bias=False), bn(c_out), nn.ReLU(),
                                  conv(c_out, c_out, 3, 1, 1, bias=False), bn(c_out))
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(conv(c_in, c_out, 1, stride, 0, bias=False), bn(c_out))

    def forward(self, x):
        return F.relu(self.body(x) + self.shortcut(x))


def resnet8(name):
    conv, bn, linear, _ = kit(name)
    return nn.Sequential(
        conv(3, 16, 3, 1, 1, bias=False), bn(16), nn.ReLU(),
        Block(name, 16, 16, 1), Block(name, 16, 32, 2), Block(name, 32, 64, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), linear(64, 10),
    )


MODELS = {"LeNet-5 1x28x28": (lenet, (1, 28, 28)), "ResNet-8 3x32x32": (resnet8, (3, 32, 32))}
IMPLS = ("bnn_fast", "torchbnn", "bayesian-torch Reparameterization", "bayesian-torch Flipout",
         "deterministic")
# Training only: the convolutions' other estimators (PyTorch compositions of two convolutions).
ESTIMATOR_IMPLS = ("bnn_fast local", "bnn_fast flipout")
TRAIN, PREDICT = "training step, batch 64", "prediction, 64 images"


def saved_for_backward(name, build, shape, device):
    """Bytes of the tensors the forward saves for autograd, each storage once, parameters
    excluded."""
    torch.manual_seed(0)
    model = build(name).to(device)
    kl = kit(name)[3]
    x = torch.randn((BATCH,) + shape).to(device)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = set()

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            seen.add(ptr)
            sizes.append(t.untyped_storage().nbytes())
        return t

    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), torch.zeros(BATCH, dtype=torch.long, device=device))
        if kl is not None:
            loss = loss + KL_WEIGHT * kl(model).reshape(())
    return sum(sizes)


def training_step(name, build, shape, device):
    torch.manual_seed(0)
    model = build(name).to(device)
    kl = kit(name)[3]
    g = torch.Generator().manual_seed(1)
    x = torch.randn((BATCH,) + shape, generator=g).to(device)
    y = torch.randint(0, 10, (BATCH,), generator=g).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=LR)

    def step():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        if kl is not None:
            loss = loss + KL_WEIGHT * kl(model).reshape(())
        loss.backward()
        opt.step()
        return loss

    return step


def prediction(name, build, shape, device, n_samples):
    torch.manual_seed(0)
    model = build(name).to(device).eval()
    x = torch.randn((BATCH,) + shape, generator=torch.Generator().manual_seed(2)).to(device)
    if name == "bnn_fast":
        def predict():
            result = bnn_fast.predictive(model, x, n_samples)
            return result.mean, result.std
    else:
        def predict():
            with torch.no_grad():
                outputs = torch.stack([model(x) for _ in range(n_samples)])
            return outputs.mean(0), outputs.std(0)
    return predict


def main(argv=None):
    args = harness.parse_args(__doc__, argv)
    if not harness.device_available(args.device):
        return
    runner = harness.Runner("conv", args)
    device = torch.device(args.device)
    n_samples = QUICK_SAMPLES if args.quick else SAMPLES
    rounds = QUICK_ROUNDS if args.quick else ROUNDS
    memory_rows = []
    for model_name, (build, shape) in MODELS.items():
        train_cases = [harness.Case(TRAIN, name, model_name, training_step(name, build, shape, device))
                       for name in IMPLS + ESTIMATOR_IMPLS]
        runner.measure_interleaved(train_cases, rounds, number=TRAIN_STEPS_PER_ROUND)
        for case in train_cases[:len(IMPLS)]:
            saved = saved_for_backward(case.sub_label, build, shape, device)
            memory_rows.append([model_name, case.sub_label,
                                f"{harness.peak_memory(case.stmt, device) / harness.MIB:.2f}",
                                f"{saved / harness.MIB:.2f}"])
        predict_cases = [harness.Case(PREDICT, name, f"{model_name}, {n_samples} samples",
                                      prediction(name, build, shape, device, n_samples))
                         for name in IMPLS]
        runner.measure_interleaved(predict_cases, QUICK_ROUNDS if args.quick else PREDICT_ROUNDS)
    runner.add_table("Memory of one training step (MiB, PyTorch's allocations)",
                     ["model", "implementation", "peak MiB", "saved for backward MiB"], memory_rows)
    rows = []
    for model_name in MODELS:
        predict_column = f"{model_name}, {n_samples} samples"
        train_ratio = runner.ratio(TRAIN, model_name, "torchbnn", "bnn_fast")
        predict_ratio = runner.ratio(PREDICT, predict_column, "torchbnn", "bnn_fast")
        floor_ratio = runner.ratio(PREDICT, predict_column, "bnn_fast", "deterministic")
        peaks = {row[1]: float(row[2]) for row in memory_rows if row[0] == model_name}
        saved = {row[1]: float(row[3]) for row in memory_rows if row[0] == model_name}
        rows.append([model_name, f"{train_ratio:.2f}x", f"{peaks['bnn_fast']:.2f} vs {peaks['torchbnn']:.2f}",
                     f"{saved['bnn_fast']:.2f} vs {saved['torchbnn']:.2f}",
                     f"{predict_ratio:.2f}x", f"{floor_ratio:.2f}x"])
        runner.check(f"{model_name}: training step, torchbnn / bnn_fast", train_ratio, ">=", 1.0)
        runner.check(f"{model_name}: training peak memory, torchbnn / bnn_fast",
                     peaks["torchbnn"] / peaks["bnn_fast"], ">=", 1.0)
        runner.check(f"{model_name}: prediction, torchbnn loop / bnn_fast predictive", predict_ratio, ">=",
                     PREDICT_TARGET)
    runner.add_table(
        "bnn_fast against torchbnn (same run)",
        ["model", "training step speedup", "training peak MiB (bnn_fast vs torchbnn)",
         "saved for backward MiB (bnn_fast vs torchbnn)", "prediction speedup",
         "prediction time / deterministic loop's"], rows)
    runner.finish()


if __name__ == "__main__":
    main()
