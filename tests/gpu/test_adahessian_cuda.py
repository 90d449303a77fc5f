"""AdaHessian on CUDA: the eager and the compiled multi-tensor step against naive.py in fp64 after every step, by the
STYLE rule (error <= 2x that of naive.py with fp32 maths), fp32 and bf16 parameters (fp32 state). The check itself
is tests/optim/test_adahessian.py's, which runs on the CPU too. The optimizer as a whole against naive.py on CUDA
is checked by benchmarks/adahessian.py before it times anything."""
from __future__ import annotations

import pytest
import torch

from tests.optim.test_adahessian import check_update_against_naive

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_update_within_baseline_of_naive_on_cuda(dtype):
    check_update_against_naive("cuda", dtype)
