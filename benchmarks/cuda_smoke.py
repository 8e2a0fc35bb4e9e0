"""Every CUDA operator once, forward and backward, every dtype, on odd shapes, for the
compute-sanitizer tools: python -m benchmarks.cuda_smoke

Run under `compute-sanitizer --tool memcheck | racecheck | initcheck | synccheck`
(benchmarks/run_gpu.sh runs all four where the tool exists), it reports any out-of-bounds or
misaligned access, shared-memory race, read of uninitialized memory or invalid barrier of our
kernels: the shapes are chosen so that row counts, feature counts and sample counts are not
multiples of the vector widths, and x is deliberately misaligned once. The outputs are also
checked for NaN (the inputs have none).
"""
import torch

import bnn_fast
from bnn_fast import _ops


def layer(out_f, in_f, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = (torch.rand(out_f, in_f, generator=g) - 0.5).to("cuda", dtype)
    ls = (torch.randn(out_f, in_f, generator=g) * 0.3 - 1.5).to("cuda", dtype)
    if not bias:
        return mu, ls, None, None
    return mu, ls, (torch.rand(out_f, generator=g) - 0.5).to("cuda", dtype), torch.full((out_f,), -2.0, device="cuda", dtype=dtype)


def finite(name, t):
    if not torch.isfinite(t).all():
        raise AssertionError(f"{name}: non-finite output")


def main():
    if not (torch.cuda.is_available() and bnn_fast.backend().cuda_compiled):
        raise SystemExit("cuda_smoke: needs a CUDA GPU and the CUDA kernels compiled")
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        finite("normal", _ops.normal((3, 1001), 7, 2, dtype=dtype, device="cuda", offset=3))
        for N, in_f, out_f, S, bias in ((1, 37, 5, 1, True), (5, 130, 3, 2, False), (16, 132, 9, 3, True),
                                        (17, 33, 7, 2, True), (40, 7, 13, 1, False)):
            mu, ls, bmu, bls = layer(out_f, in_f, dtype, bias)
            x = torch.randn(1 + N * in_f, device="cuda", dtype=dtype)[1:].view(1, N, in_f)  # misaligned
            params = [t.requires_grad_() for t in (mu, ls, bmu, bls) if t is not None]
            xg = x.clone().requires_grad_()
            for op in (_ops.bayes_linear, _ops.bayes_linear_local, _ops.bayes_linear_flipout):
                y = op(xg, mu, ls, bmu, bls, 11, S)
                finite(op.__name__, y)
                grads = torch.autograd.grad(y.float().square().sum(), [xg] + params)
                for gr in grads:
                    finite(op.__name__ + " grad", gr)
            with torch.no_grad():
                finite("bayes_linear_inference", _ops.bayes_linear(x, mu, ls, bmu, bls, 12, S))
        if dtype in (torch.float32, torch.float64):
            mus = [torch.randn(33, 7, device="cuda", dtype=dtype, requires_grad=True), torch.randn(5, device="cuda", dtype=dtype, requires_grad=True)]
            lss = [torch.randn(33, 7, device="cuda", dtype=dtype, requires_grad=True), torch.randn(5, device="cuda", dtype=dtype, requires_grad=True)]
            kl = _ops.gaussian_kl(mus, lss, 0.0, -2.3)
            finite("gaussian_kl", kl)
            for gr in torch.autograd.grad(kl, mus + lss):
                finite("gaussian_kl grad", gr)
            with torch.no_grad():
                for in_f, hidden, out_f, N, S in ((1, 1000, 1, 300, 3), (3, 65, 2, 7, 2), (8, 31, 8, 1, 5)):
                    l1, l2 = layer(hidden, in_f, dtype, seed=1), layer(out_f, hidden, dtype, bias=False, seed=2)
                    x = torch.randn(1, N, in_f, device="cuda", dtype=dtype)
                    finite("bayes_mlp_inference", _ops.bayes_mlp_inference(x, l1, 3, l2, 4, S))
    torch.cuda.synchronize()
    print("cuda_smoke: every CUDA operator ran")


if __name__ == "__main__":
    main()
