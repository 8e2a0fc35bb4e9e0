"""The counter-based RNG contract: Philox known answers, the normal operator against its twin,
determinism, and the statistics of the noise."""
import math
import os

import pytest
import torch

from bnn_fast import _ops, reference
from conftest import DEVICES, SIMD_LEVELS, requires_ext

KAT_FILE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "philox4x32_10_kat.txt")
# Random123's kat_vectors for philox4x32-10: counter[4], key[2], expected[4].
KAT = [
    ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0], [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
]


def kat_vectors():
    vectors = list(KAT)
    if os.path.exists(KAT_FILE):
        with open(KAT_FILE) as f:
            for line in f:
                if line.startswith("philox4x32 10"):
                    v = [int(t, 16) for t in line.split()[2:]]
                    vectors.append((v[:4], v[4:6], v[6:]))
    return vectors


@requires_ext
@pytest.mark.parametrize("counter,key,expected", kat_vectors())
def test_cpp_philox_matches_known_answers(counter, key, expected):
    out = torch.ops.bnn_fast.philox4x32_10(torch.tensor([counter]), torch.tensor([key]))
    assert out[0].tolist() == expected


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_reference_philox_matches_known_answers(counter, key, expected):
    out = reference.philox4x32_10([torch.tensor(c) for c in counter], [torch.tensor(k) for k in key])
    assert [int(t) for t in out] == expected


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("simd", SIMD_LEVELS)
def test_normal_equals_reference(device, simd, monkeypatch):
    monkeypatch.setenv("BNN_FAST_CPU_SIMD", simd)
    seed = 0xDEADBEEF12345678
    got = _ops.normal((1000, 37), seed, 5, device=device, offset=3)
    want = reference.normal((1000, 37), seed, 5, device=device, offset=3)
    # Same integers; log/sin/cos may differ by an ulp or two between libm, Sleef and torch.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)


@requires_ext
@pytest.mark.parametrize("simd", SIMD_LEVELS)
def test_normal_is_bit_identical_for_any_split(simd, monkeypatch):
    monkeypatch.setenv("BNN_FAST_CPU_SIMD", simd)
    whole = _ops.normal((5000,), 42, 1)
    for start, stop in [(0, 7), (5, 70), (33, 4097), (1001, 5000), (4999, 5000)]:
        part = _ops.normal((stop - start,), 42, 1, offset=start)
        assert torch.equal(part, whole[start:stop])


@requires_ext
def test_normal_is_bit_identical_for_any_thread_count():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _ops.normal((300_001,), 7, 0)
        torch.set_num_threads(2)
        two = _ops.normal((300_001,), 7, 0)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


@requires_ext
def test_normal_float64_is_float32_noise_cast():
    a = _ops.normal((999,), 3, 2, dtype=torch.float64)
    b = _ops.normal((999,), 3, 2, dtype=torch.float32)
    assert a.dtype == torch.float64 and torch.equal(a, b.double())


@requires_ext
@pytest.mark.parametrize("n,offset", [(100_003, 5), (64, 64), (63, 1), (130, 62), (1, 0),
                                      (1_000, (1 << 34) - 500)])
def test_normal_every_simd_level_gives_the_same_bits(monkeypatch, n, offset):
    # The scalar path runs box_muller.h's log and sincos, the AVX2 and AVX-512 paths their 8- and
    # 16-lane forms in cpu/fastmath.h: the same operations in the same order. Odd offsets and
    # lengths: partial 32- and 64-normal groups at both ends; the last case crosses block 2^32,
    # where the counter's high word changes. (Where the CPU has no AVX-512F, "1"
    # is AVX2 and two of the three runs take the same path.)
    runs = {}
    for level in SIMD_LEVELS:
        monkeypatch.setenv("BNN_FAST_CPU_SIMD", level)
        runs[level] = _ops.normal((n,), 11, 0, offset=offset)
    for level in SIMD_LEVELS[1:]:
        assert torch.equal(runs[level], runs[SIMD_LEVELS[0]]), level


@requires_ext
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("simd", SIMD_LEVELS)
def test_normal_cpu_and_cuda_are_bit_identical(simd, monkeypatch):
    # The CUDA kernels run box_muller.h's scalar functions, written with non-contracting
    # operations, so the GPU gives the CPU's bits.
    monkeypatch.setenv("BNN_FAST_CPU_SIMD", simd)
    cpu = _ops.normal((1 << 20,), 99, 3, offset=7)
    gpu = _ops.normal((1 << 20,), 99, 3, device="cuda", offset=7).cpu()
    assert torch.equal(cpu, gpu), f"{(cpu != gpu).sum().item()} of {cpu.numel()} normals differ"


def test_normal_rejects_negative_offset():
    with pytest.raises(ValueError, match="offset"):
        _ops.normal((3,), 0, 0, offset=-1)


def test_normal_rejects_integer_dtype():
    with pytest.raises(TypeError, match="dtype"):
        _ops.normal((3,), 0, 0, dtype=torch.int32)


def test_normal_empty_shape():
    assert _ops.normal((0, 4), 1, 0).shape == (0, 4)


# ---- statistics (on the active backend) -------------------------------------------------------

N_STATS = 1 << 22


@pytest.fixture(scope="module")
def noise():
    return _ops.normal((N_STATS,), 2024, 0).double()


def test_noise_mean_and_variance(noise):
    se = 1 / math.sqrt(N_STATS)
    assert abs(noise.mean().item()) < 5 * se
    assert abs(noise.var().item() - 1) < 5 * math.sqrt(2) * se


def test_noise_passes_kolmogorov_smirnov(noise):
    x = noise[: 1 << 20].sort().values
    n = x.numel()
    cdf = torch.special.ndtr(x)
    ecdf_hi = torch.arange(1, n + 1, dtype=torch.float64) / n
    d = torch.maximum(ecdf_hi - cdf, cdf - (ecdf_hi - 1 / n)).max().item()
    assert d < 1.95 / math.sqrt(n)  # alpha = 0.001


def test_noise_neighbours_are_uncorrelated(noise):
    se = 1 / math.sqrt(N_STATS)
    for lag in (1, 2, 3, 4, 5):  # lags inside and across Philox blocks and Box-Muller pairs
        r = torch.corrcoef(torch.stack([noise[:-lag], noise[lag:]]))[0, 1].item()
        assert abs(r) < 5 * se, lag


def test_noise_streams_and_seeds_are_uncorrelated():
    n = 1 << 20
    se = 1 / math.sqrt(n)
    base = _ops.normal((n,), 5, 0).double()
    for other in (_ops.normal((n,), 5, 1), _ops.normal((n,), 6, 0), _ops.normal((n,), 5, 1 << 32)):
        r = torch.corrcoef(torch.stack([base, other.double()]))[0, 1].item()
        assert abs(r) < 5 * se


def test_noise_has_tails_up_to_five_sigma():
    z = _ops.normal((1 << 24,), 77, 0)
    # P(|z| > 5) = 5.7e-7: about 9.6 expected in 2^24 draws.
    count = (z.abs() > 5).sum().item()
    assert 1 <= count <= 30
    assert z.abs().max().item() < 6.8  # the contract's largest possible radius is sqrt(2 * 33 ln 2)
