"""Causal mask buffers on CUDA: the block-wise proof (``attention_mask._triangle``) runs on the buffer's device with
bounded extra memory, up to 32768 x 32768 (BUFFER_PROOF_LIMIT), and the demo's attention block with a 16384 x 16384
buffer is rewritten to SDPA with is_causal=True. Prints the proof's time (``-s``)."""
from __future__ import annotations

import time

import pytest
import torch

from hhfft.lowering.backend import explain
from hhfft.models.hyena import HyenaConfig, HyenaLM
from hhfft.passes import attention_mask

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

MiB = 1 << 20


def _timed_proof(t: torch.Tensor) -> tuple:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    got = attention_mask._triangle(t)
    torch.cuda.synchronize()
    return got, time.perf_counter() - t0, (torch.cuda.max_memory_allocated() - base) / MiB


@pytest.mark.parametrize("n, dtype", [(16384, torch.bool), (32768, torch.bool), (16384, torch.float32)],
                         ids=["16384-bool", "32768-bool", "16384-fp32"])
def test_proof_on_the_buffer_device(n, dtype):
    assert n * n <= attention_mask.BUFFER_PROOF_LIMIT
    keep = torch.ones(n, n, dtype=torch.bool, device="cuda").tril_()
    t = keep if dtype == torch.bool else torch.zeros(n, n, device="cuda").masked_fill_(~keep, float("-inf"))
    del keep
    attention_mask._triangle(t[:64, :64])  # warm-up (kernels loaded)
    got, dt, extra = _timed_proof(t)
    print(f"\n{n}x{n} {str(dtype)[6:]}: proof {dt * 1e3:.1f} ms, {extra:.0f} MiB extra")
    want = ("tril", 0, True, False) if dtype == torch.bool else ("tril", 0, 0.0, float("-inf"))
    assert got == want, got
    # temporaries: a few blocks of _BUFFER_BLOCK elements (4-byte ones for fp32), not a copy of the buffer
    assert extra <= 4 * attention_mask._BUFFER_BLOCK * t.element_size() / MiB + 16, extra
    t[n - 1, n // 2] = False if dtype == torch.bool else float("-inf")  # one wrong element in the last block
    got, dt, _ = _timed_proof(t)
    assert got is None


def test_demo_attention_with_a_16384_buffer_is_causal():
    cfg = HyenaConfig(width=64, n_layers=4, n_heads=2, max_len=16384, conv_kernel=17, filter_order=8)
    model = HyenaLM(cfg).cuda()
    assert model.blocks[3].mixer.mask.numel() > 1 << 24  # above the old limit
    tokens = torch.randint(0, cfg.vocab_size, (1, 256), device="cuda")
    sites = explain(model, tokens).select(kind="attention")
    assert len(sites) == 1 and sites[0].decision == "rewritten", [(s.decision, s.reason) for s in sites]
    rec = sites[0].record
    assert rec.mask_kind == "causal" and rec.sdpa.kwargs["is_causal"] is True and rec.sdpa.kwargs["attn_mask"] is None
