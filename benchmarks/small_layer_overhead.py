"""Where the time of small layers goes: per-call overhead and the seed article's passes.

Usage: python -m benchmarks.small_layer_overhead

Medians of torch.utils.benchmark (2 threads), printed as one list; each line compares cases
measured in the same run:
- the bayes_linear operator called with gradients (a 4->3 layer, 2 rows), and without;
- a 4->3 BayesLinear forward+backward, bnn_fast against torchbnn;
- the seed article's own loop, one forward pass of the 1-1000-1 network on 300 points under
  torch.no_grad, bnn_fast against torchbnn (what a user who keeps that loop gets);
- one chunk of 6 samples of bnn_fast.predictive on that network, split into layer 1, the ReLU
  and layer 2;
- the backward operators of the article's two layers in its training step (500 rows; layer 1
  without grad_x, as its input needs none), each timed alone;
- ATen's bmm on the shape of layer 2 in that chunk ([6, 300, 1000] x [6, 1000, 1]) against
  reading its input once (a sum).
Both libraries run under bnn_fast.utils.retain_cpu_memory().
"""
import torch
import torchbnn
from torch import nn
from torch.utils import benchmark

import bnn_fast
from bnn_fast.sampling import sample_many

THREADS = 2


def median_us(fn, min_run_time=1.0):
    timer = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=THREADS)
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e6


def article_net(lib):
    torch.manual_seed(0)
    return nn.Sequential(lib.BayesLinear(0, 0.1, 1, 1000), nn.ReLU(), lib.BayesLinear(0, 0.1, 1000, 1))


def main():
    torch.set_num_threads(THREADS)
    bnn_fast.utils.retain_cpu_memory()
    print(bnn_fast.backend())

    layer = bnn_fast.BayesLinear(0, 0.1, 4, 3)
    x = torch.randn(2, 4)
    args = (x.unsqueeze(0), layer.weight_mu, layer.weight_log_sigma, layer.bias_mu, layer.bias_log_sigma, 5, 1)
    with_grad = median_us(lambda: torch.ops.bnn_fast.bayes_linear(*args))
    with torch.no_grad():
        without = median_us(lambda: torch.ops.bnn_fast.bayes_linear(*args))
    print(f"bayes_linear operator call, 4->3, 2 rows: {with_grad:.1f} us with gradients, {without:.1f} us without")

    tb_layer = torchbnn.BayesLinear(0, 0.1, 4, 3)
    times = {name: median_us(lambda m=m: m(x).sum().backward()) for name, m in (("bnn_fast", layer), ("torchbnn", tb_layer))}
    print(f"BayesLinear 4->3 forward+backward, 2 rows: bnn_fast {times['bnn_fast']:.1f} us, torchbnn {times['torchbnn']:.1f} us")

    points = torch.linspace(-2, 2, 300).unsqueeze(1)
    nets = {"bnn_fast": article_net(bnn_fast), "torchbnn": article_net(torchbnn)}
    with torch.no_grad():
        times = {name: median_us(lambda m=m: m(points)) for name, m in nets.items()}
    print(f"article loop, one forward pass (300 points, no_grad): bnn_fast {times['bnn_fast']:.1f} us, "
          f"torchbnn {times['torchbnn']:.1f} us")

    layer1, _, layer2 = nets["bnn_fast"]
    with torch.no_grad(), sample_many(6):
        hidden = layer1(points)
        relu = torch.relu(hidden)
        parts = {"layer 1": median_us(lambda: layer1(points)),
                 "ReLU": median_us(lambda: torch.relu(hidden)),
                 "layer 2": median_us(lambda: layer2(relu))}
    print("predictive chunk of 6 samples: " + ", ".join(f"{k} {v:.0f} us" for k, v in parts.items()))

    train_x = torch.linspace(-2, 2, 500).reshape(1, 500, 1)
    backward = {}
    with torch.no_grad():
        for name, lay, inp, mask in (("layer 1", layer1, train_x, [False] + [True] * 4),
                                     ("layer 2", layer2, torch.relu(layer1(train_x[0])).unsqueeze(0), [True] * 5)):
            params = (lay.weight_mu, lay.weight_log_sigma, lay.bias_mu, lay.bias_log_sigma)
            y, saved = torch.ops.bnn_fast.bayes_linear(inp, *params, 7, 1)
            grad = torch.randn_like(y)
            backward[name] = median_us(lambda inp=inp, params=params, saved=saved, grad=grad, mask=mask:
                                       torch.ops.bnn_fast.bayes_linear_backward(
                                           grad, inp, params[0], params[1], params[3], saved, 7, 1, mask))
    print("training-step backward operators, alone: " + ", ".join(f"{k} {v:.0f} us" for k, v in backward.items()))

    a, b = torch.randn(6, 300, 1000), torch.randn(6, 1000, 1)
    print(f"bmm [6, 300, 1000] x [6, 1000, 1]: {median_us(lambda: torch.bmm(a, b)):.0f} us; "
          f"reading the input once (sum): {median_us(lambda: a.sum()):.0f} us")


if __name__ == "__main__":
    main()
