"""The gradient estimators of bnn_fast.BayesLinear: training-step time and gradient variance.

A 1024x1024 layer at batch 32 and 256, with estimator "reparam" (one weight sample shared by the
batch, torchbnn's), "local" (local reparameterization: independent noise per output element)
and "flipout" (one shared perturbation, sign-flipped per row), and torchbnn.BayesLinear as the
anchor, all with the same parameters (loaded through state_dict). The loss is the MSE against a
fixed random target with reduction 'mean' (over batch and outputs), so the gradient is an
average over examples and gradients at the two batch sizes are on the same scale.

  i.  Time of one training step: forward, loss, and the gradients of the four parameters.
  ii. The variance of the gradient of weight_mu over 50 draws of the noise at fixed inputs,
      target and parameters (per element, then averaged over the elements), at each batch size.
      The two batch sizes use independent random inputs. Noise that is independent per example
      averages out over the batch: var(batch 32) / var(batch 256) is then about 256/32 = 8.
      Noise shared by the batch (reparam, torchbnn) averages out only as far as the examples'
      gradient contributions are uncorrelated, which depends on the inputs, so two kinds are
      measured: ReLU(N(0, 1)), non-negative like the activations a hidden layer receives (the
      examples' inputs overlap, the shared noise does not average out: ratio about 1), and
      N(0, 1), zero-mean (1024-dim inputs of different examples are nearly orthogonal, so even
      shared noise largely averages out). The timing uses the ReLU(N(0, 1)) inputs (the values do
      not change the work).
"""
import torch
import torch.nn.functional as F
import torchbnn

import bnn_fast
from bnn_fast.estimators import ESTIMATORS
from benchmarks import harness

PRIOR_MU, PRIOR_SIGMA = 0.0, 0.1
FEATURES = 1024
BATCHES = (32, 256)
DRAWS = 50
# Input kinds of the variance table, as maps applied to N(0, 1) draws; the first is also timed.
INPUTS = {"ReLU(N(0,1))": torch.relu, "N(0,1)": lambda x: x}


def column(batch: int) -> str:
    return f"{FEATURES}x{FEATURES} b={batch}"


def make_layers(device) -> dict:
    """name -> layer, with identical parameters."""
    torch.manual_seed(0)
    tb = torchbnn.BayesLinear(PRIOR_MU, PRIOR_SIGMA, FEATURES, FEATURES)
    layers = {}
    for name in ESTIMATORS:
        layer = bnn_fast.BayesLinear(PRIOR_MU, PRIOR_SIGMA, FEATURES, FEATURES, estimator=name)
        layer.load_state_dict(tb.state_dict())
        layers[f"bnn_fast {name}"] = layer
    layers["torchbnn"] = tb
    return {name: layer.to(device) for name, layer in layers.items()}


def train_step(layer, x, target, params):
    """Forward, MSE loss, and the gradients of `params`. torch.autograd.grad returns fresh
    gradients instead of accumulating into .grad, so each iteration does the same work."""
    def step():
        return torch.autograd.grad(F.mse_loss(layer(x), target), params)
    return step


def gradient_variance(layer, x, target) -> float:
    """The variance of d loss / d weight_mu over DRAWS noise draws, per element (unbiased), then
    averaged over the elements; only the noise changes between draws."""
    grads = torch.stack([train_step(layer, x, target, [layer.weight_mu])()[0] for _ in range(DRAWS)])
    return grads.double().var(0).mean().item()


def main(argv=None):
    args = harness.parse_args(__doc__, argv)
    if not harness.device_available(args.device):
        return
    runner = harness.Runner("estimators", args)
    device = runner.device
    layers = make_layers(device)
    label = f"Training step, MSE loss, fwd+bwd ({device.type})"
    torch.manual_seed(1)
    # (input kind, batch) -> (inputs, target)
    data = {(kind, b): (transform(torch.randn(b, FEATURES, device=device)), torch.randn(b, FEATURES, device=device))
            for kind, transform in INPUTS.items() for b in BATCHES}
    timing_inputs = next(iter(INPUTS))

    print(f"training step of a {FEATURES}x{FEATURES} layer, batches {BATCHES}, on {args.device}, "
          f"{args.threads} threads", flush=True)
    runner.measure([
        harness.Case(label, name, column(b), train_step(layer, *data[timing_inputs, b], list(layer.parameters())))
        for b in BATCHES for name, layer in layers.items()
    ])

    print(f"gradient variance over {DRAWS} draws", flush=True)
    torch.manual_seed(2)
    small, large = BATCHES
    rows = []
    for kind in INPUTS:
        for name, layer in layers.items():
            var_small, var_large = (gradient_variance(layer, *data[kind, b]) for b in BATCHES)
            rows.append([name, kind, f"{var_small:.4g}", f"{var_large:.4g}", f"{var_small / var_large:.2f}"])
    runner.add_table(
        f"Gradient variance of weight_mu over {DRAWS} noise draws, fixed data and parameters, mean loss "
        f"(ratio ~{large // small}: the noise averages out over the batch, ~1: it does not)",
        ["implementation", "inputs", f"var b={small}", f"var b={large}", f"var(b={small}) / var(b={large})"],
        rows,
    )
    runner.finish(baseline="torchbnn")


if __name__ == "__main__":
    main()
