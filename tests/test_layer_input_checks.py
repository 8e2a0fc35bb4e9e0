"""Bad inputs to the Bayesian layers fail early with errors that name the argument and what was
expected; good inputs (everything torchbnn accepts) still pass."""
import pytest
import torch

from bnn_fast.modules import BayesBatchNorm2d, BayesConv2d, BayesLinear

# name -> (layer factory, a valid input shape)
LAYERS = {
    "linear": (lambda: BayesLinear(0, 0.1, 128, 4), (2, 128)),
    "conv": (lambda: BayesConv2d(0, 0.1, 3, 4, 3), (2, 3, 5, 5)),
    "batchnorm": (lambda: BayesBatchNorm2d(0, 0.1, 3), (2, 3, 4, 4)),
}


def layer_and_input(name, **tensor_kwargs):
    factory, shape = LAYERS[name]
    return factory(), torch.ones(shape, **tensor_kwargs)


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_non_floating_input_raises_type_error_naming_input_and_dtype(name, dtype):
    layer, x = layer_and_input(name, dtype=dtype)
    message = f"input must be a floating-point tensor, got dtype {dtype}"
    with pytest.raises(TypeError, match=message):
        layer(x)


@pytest.mark.parametrize("name", LAYERS)
def test_non_tensor_input_raises_type_error(name):
    layer, x = layer_and_input(name)
    with pytest.raises(TypeError, match="input must be a torch.Tensor, got list"):
        layer(x.tolist())


@pytest.mark.parametrize("name", LAYERS)
def test_input_on_another_device_raises_naming_both_devices(name):
    layer, x = layer_and_input(name, device="meta")
    with pytest.raises(RuntimeError, match="input is on device meta.*buffers are on device cpu"):
        layer(x)


@pytest.mark.parametrize("name", LAYERS)
def test_parameters_on_another_device_raise_naming_both_devices(name):
    layer, x = layer_and_input(name)
    layer.to("meta")
    with pytest.raises(RuntimeError, match="input is on device cpu.*buffers are on device meta"):
        layer(x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", LAYERS)
def test_cpu_input_to_cuda_layer_raises_naming_both_devices(name):
    layer, x = layer_and_input(name)
    layer.cuda()
    with pytest.raises(RuntimeError, match="input is on device cpu.*buffers are on device cuda:0"):
        layer(x)


def test_linear_wrong_last_dim_names_in_features():
    message = r"BayesLinear: input must have last dim 128 \(in_features\), got 64"
    with pytest.raises(ValueError, match=message):
        BayesLinear(0, 0.1, 128, 4)(torch.ones(2, 64))


def test_linear_zero_dim_input_is_refused():
    with pytest.raises(ValueError, match="input must have at least 1 dimension"):
        BayesLinear(0, 0.1, 1, 4)(torch.tensor(1.0))


@pytest.mark.parametrize("shape", [(128,), (3, 5, 128)])
def test_linear_accepts_any_leading_dims(shape):
    assert BayesLinear(0, 0.1, 128, 4)(torch.ones(shape)).shape == shape[:-1] + (4,)


@pytest.mark.parametrize("shape", [(2, 5, 5, 5), (5, 5, 5)])
def test_conv_wrong_channels_names_in_channels(shape):
    message = r"BayesConv2d: input must have 3 channels \(in_channels\), got 5"
    with pytest.raises(ValueError, match=message):
        BayesConv2d(0, 0.1, 3, 4, 3)(torch.ones(shape))


@pytest.mark.parametrize("shape", [(3, 5), (1, 2, 3, 5, 5)])
def test_conv_input_must_be_3d_or_4d(shape):
    message = rf"BayesConv2d: input must be 4D .* or 3D .*, got {len(shape)}D input"
    with pytest.raises(ValueError, match=message):
        BayesConv2d(0, 0.1, 3, 4, 3)(torch.ones(shape))


def test_conv_accepts_unbatched_input():
    assert BayesConv2d(0, 0.1, 3, 4, 3)(torch.ones(3, 5, 5)).shape == (4, 3, 3)


@pytest.mark.parametrize("shape", [(2, 3), (2, 3, 4), (1, 2, 3, 4, 4)])
def test_batchnorm_input_must_be_4d(shape):
    message = rf"BayesBatchNorm2d: input must be 4D \(N, C, H, W\), got {len(shape)}D input"
    with pytest.raises(ValueError, match=message):
        BayesBatchNorm2d(0, 0.1, 3)(torch.ones(shape))


@pytest.mark.parametrize("kwargs", [{}, {"affine": False}, {"track_running_stats": False}])
def test_batchnorm_wrong_channels_names_num_features(kwargs):
    message = r"BayesBatchNorm2d: input must have 3 channels \(num_features\) in dim 1, got 5"
    with pytest.raises(ValueError, match=message):
        BayesBatchNorm2d(0, 0.1, 3, **kwargs)(torch.ones(2, 5, 4, 4))


def test_batchnorm_without_per_channel_state_accepts_any_channels():
    # Nothing of size num_features takes part, so torchbnn (and nn.BatchNorm2d) accept it.
    layer = BayesBatchNorm2d(0, 0.1, 3, affine=False, track_running_stats=False)
    assert layer(torch.randn(2, 5, 4, 4)).shape == (2, 5, 4, 4)
