"""Direct calls of the fused linears' backward operators with mismatched tensors: an error that
names the argument, never a read past an allocation (the kernels read weight_log_sigma,
bias_log_sigma, x and var through raw pointers sized by weight_mu)."""
import pytest
import torch

from conftest import DEVICES, make_layer, requires_ext

pytestmark = requires_ext

OPS = ["bayes_linear_backward", "bayes_linear_local_backward", "bayes_linear_flipout_backward"]

# (changes, exception, message after "<op>: ")
BAD = [
    (dict(w_ls=torch.zeros(3, 5)), ValueError, r"weight_log_sigma must have the shape of weight_mu"),
    (dict(w_ls=torch.zeros(12)), ValueError, r"weight_log_sigma must have the shape of weight_mu"),
    (dict(w_ls=torch.zeros(3, 4, dtype=torch.float64)), TypeError, r"weight_log_sigma must have dtype"),
    (dict(b_ls=torch.zeros(5)), ValueError, r"bias_log_sigma must have shape \[3\]"),
    (dict(b_ls=torch.zeros(3, dtype=torch.float64)), TypeError, r"bias_log_sigma must have dtype"),
    (dict(x=torch.randn(1, 2, 5)), ValueError, r"x must have shape \[1 or 1, N, 4\]"),
    (dict(x=torch.randn(1, 2, 4, dtype=torch.float64)), TypeError, r"x must have dtype"),
]


def backward_args(op, device, **changes):
    """(grad_out, x, weight_mu, weight_log_sigma, bias_log_sigma, saved, seed, n_samples, mask)
    of a valid call of `op` with one sample, 2 rows, 4 inputs and 3 outputs, then `changes`."""
    mu, ls, _, bls = make_layer(3, 4, torch.float32, "cpu")
    args = dict(g=torch.randn(1, 2, 3), x=torch.randn(1, 2, 4), w_mu=mu, w_ls=ls, b_ls=bls)
    args.update(changes)
    args = {k: v.to(device) for k, v in args.items()}
    # saved: empty (the backward samples the weight again); local's is var [X, N, out].
    saved = torch.rand(1, 2, 3, device=device) if op == "bayes_linear_local_backward" else torch.empty(0, device=device)
    return (args["g"], args["x"], args["w_mu"], args["w_ls"], args["b_ls"], saved, 7, 1, [True] * 5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_a_valid_direct_call_runs(op, device):
    grads = getattr(torch.ops.bnn_fast, op)(*backward_args(op, device))
    assert grads[2].shape == (3, 4) and grads[4].shape == (3,)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("changes, exc, msg", BAD)
def test_mismatched_tensors_are_refused_naming_the_argument(op, device, changes, exc, msg):
    with pytest.raises(exc, match=f"{op}: {msg}"):
        getattr(torch.ops.bnn_fast, op)(*backward_args(op, device, **changes))


@pytest.mark.parametrize("device", DEVICES)
def test_local_backward_refuses_var_of_another_dtype(device):
    args = list(backward_args("bayes_linear_local_backward", device))
    args[5] = args[5].double()
    with pytest.raises(TypeError, match="bayes_linear_local_backward: var must have dtype"):
        torch.ops.bnn_fast.bayes_linear_local_backward(*args)
