"""KL divergence forward+backward over a model of ~10M Bayesian parameters.

Times bayesian_kl_loss(model) followed by the gradient with respect to every mu and log_sigma, for
  - bnn_fast:            bnn_fast.functional.bayesian_kl_loss (the compiled kernel when built),
  - torchbnn:            torchbnn.functional.bayesian_kl_loss,
  - bnn_fast reference:  bnn_fast.reference.gaussian_kl, the pure-PyTorch fallback, called
                         directly on the same tensors,
on models with identical parameters. Target: bnn_fast at least 5x faster than torchbnn.
"""
import torch
import torch.nn as nn
import torchbnn

import bnn_fast
from bnn_fast import reference
from benchmarks import harness

PRIOR_MU, PRIOR_SIGMA = 0.0, 0.1
# 1024*4096 + 4096*1024 + 1024*2048 = 10,485,760 weights, plus 7,168 biases.
WIDTHS = (1024, 4096, 1024, 2048)
LABEL = "KL forward+backward"
TARGET_SPEEDUP = 5.0
# Only three cases, each 0.1 to 2 s a call: a longer run per case gives their medians several
# samples for the price of a few seconds.
MIN_RUN_TIME = 5.0


def build(lib) -> nn.Sequential:
    return nn.Sequential(*(lib.BayesLinear(PRIOR_MU, PRIOR_SIGMA, n_in, n_out) for n_in, n_out in zip(WIDTHS, WIDTHS[1:])))


def make_models(device):
    """torchbnn and bnn_fast models with identical parameters."""
    torch.manual_seed(0)
    tb_model = build(torchbnn)
    with torch.no_grad():
        # At initialization every log_sigma equals the prior's; spread them so the KL has a
        # log-sigma term and the value check below means something.
        for name, p in tb_model.named_parameters():
            if name.endswith("log_sigma"):
                p.add_(0.1 * torch.randn_like(p))
    bf_model = build(bnn_fast)
    bf_model.load_state_dict(tb_model.state_dict())
    return tb_model.to(device), bf_model.to(device)


def kl_step(kl_fn, params):
    """One forward+backward: torch.autograd.grad returns fresh gradients instead of accumulating
    into .grad, so every implementation does the same work on every iteration."""
    def step():
        kl = kl_fn()
        return kl, torch.autograd.grad(kl, params)
    return step


def main(argv=None):
    args = harness.parse_args(__doc__, argv)
    if not harness.device_available(args.device):
        return
    runner = harness.Runner("kl", args, min_run_time=MIN_RUN_TIME)
    tb_model, bf_model = make_models(runner.device)
    layers = list(bf_model)
    mus = [t for m in layers for t in (m.weight_mu, m.bias_mu)]
    log_sigmas = [t for m in layers for t in (m.weight_log_sigma, m.bias_log_sigma)]
    numel = sum(t.numel() for t in mus)
    column = f"{numel / 1e6:.1f}M params"

    # Gradients are taken in model.parameters() order for all three, so they compare directly.
    bf_params, tb_params = list(bf_model.parameters()), list(tb_model.parameters())
    steps = {
        "bnn_fast": kl_step(lambda: bnn_fast.functional.bayesian_kl_loss(bf_model), bf_params),
        "torchbnn": kl_step(lambda: torchbnn.functional.bayesian_kl_loss(tb_model), tb_params),
        # The fallback's formula and float64 accumulation, without bayesian_kl_loss's grouping.
        "bnn_fast reference": kl_step(
            lambda: reference.gaussian_kl(mus, log_sigmas, PRIOR_MU, bf_model[0].prior_log_sigma) / numel,
            bf_params,
        ),
    }
    print(f"KL of {numel:,} Bayesian parameters on {args.device}, {args.threads} threads")
    runner.measure([harness.Case(LABEL, name, column, step) for name, step in steps.items()])

    # Sanity: the three agree on the value and the gradients.
    results = {name: step() for name, step in steps.items()}
    kl_tb, grads_tb = results["torchbnn"]
    rows = []
    for name, (kl, grads) in results.items():
        grad_diff = max((g - g_tb).abs().max().item() for g, g_tb in zip(grads, grads_tb))
        rows.append([name, f"{kl.item():.9g}", f"{abs(kl.item() - kl_tb.item()) / abs(kl_tb.item()):.2e}", f"{grad_diff:.2e}"])
    runner.add_table(
        "Sanity: KL value (reduction='mean') and gradients vs torchbnn",
        ["implementation", "KL", "relative difference", "max abs gradient difference"],
        rows,
    )

    speedup = runner.ratio(LABEL, column, "torchbnn", "bnn_fast")
    runner.check(f"bnn_fast KL fwd+bwd speedup vs torchbnn ({column})", speedup, ">=", TARGET_SPEEDUP)
    runner.finish(baseline="torchbnn")


if __name__ == "__main__":
    main()
