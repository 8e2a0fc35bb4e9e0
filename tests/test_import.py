"""What `import bnn_fast` costs on top of `import torch`."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = """
import sys, time
import torch
start = time.perf_counter()
import bnn_fast
print(time.perf_counter() - start, 'torch._dynamo' in sys.modules, bnn_fast.backend().name)
"""


def import_cost():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    seconds, dynamo, backend = out.stdout.split()
    return float(seconds), dynamo == "True", backend


def test_import_does_not_load_the_compiler_stack():
    # torch._dynamo alone took about 1 s to import; only torch.compile needs it, and it imports
    # it itself. (The compiled new_seed stays eager under torch.compile: test_linear_op.py.)
    _, dynamo, backend = import_cost()
    assert not dynamo, f"import bnn_fast imported torch._dynamo (backend {backend})"


def test_import_within_a_fifth_of_a_second_of_torch():
    # The best of three processes, so that a busy machine does not fail it: the import itself
    # takes about 0.03 s.
    assert min(import_cost()[0] for _ in range(3)) < 0.2
