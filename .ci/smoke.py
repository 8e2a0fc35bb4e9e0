"""Smoke test of an installed bnn_fast: the backend, a training step through the fused kernels,
the KL against its reference, and opcheck. Run from outside the source tree."""
import argparse
import math
import sys

import torch
import torch.nn as nn

import bnn_fast as bnn
from bnn_fast import _ops, reference

parser = argparse.ArgumentParser()
parser.add_argument("--expect-backend", required=True, choices=["cpp", "cuda", "reference"])
args = parser.parse_args()

info = bnn.backend()
print(info)
print("bnn_fast imported from", bnn.__file__)
assert info.name == args.expect_backend, f"expected backend {args.expect_backend}, got {info.name}"

torch.manual_seed(0)
model = nn.Sequential(bnn.BayesLinear(0, 0.1, 8, 32), nn.ReLU(), bnn.BayesLinear(0, 0.1, 32, 1))
opt = torch.optim.Adam(model.parameters(), lr=0.01)
x, y = torch.randn(64, 8), torch.randn(64, 1)
for _ in range(20):
    loss = nn.functional.mse_loss(model(x), y) + 0.01 * bnn.BKLLoss()(model)
    opt.zero_grad()
    loss.backward()
    opt.step()
assert torch.isfinite(loss), loss

mus = [p for n, p in model.named_parameters() if n.endswith("_mu")]
lss = [p for n, p in model.named_parameters() if n.endswith("_log_sigma")]
got = _ops.gaussian_kl(mus, lss, 0.0, math.log(0.1))
want = reference.gaussian_kl(mus, lss, 0.0, math.log(0.1))
assert torch.allclose(got, want, rtol=1e-6), (got, want)

if info.cpp:
    w = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.bnn_fast.bayes_linear.default,
                          (torch.randn(1, 2, 4, dtype=torch.float64), w, torch.zeros_like(w), None, None, 1, 2))
print("smoke test passed")
sys.exit(0)
