import pytest
import torch

import bnn_fast

EXT = bnn_fast._ops.extension_loaded()
CUDA = torch.cuda.is_available() and bnn_fast.backend().cuda_compiled

requires_ext = pytest.mark.skipif(not EXT, reason="compiled extension not loaded: " + bnn_fast.backend().reason)

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and the CUDA kernels compiled"),
    ),
]
