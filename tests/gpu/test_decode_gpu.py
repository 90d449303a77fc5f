"""Constant-state decoding on CUDA: the Triton recurrent step kernel against the fp64 quadratic reference (STYLE.md
rule: error <= 2x PyTorch's at the same dtype, PyTorch's being the plain-torch step with an fp32 state and the
quadratic form in that dtype), over F, D in {32, 64, 128}, GQA 1/2/4, fp16/bf16/fp32, padding tokens, with
NaN-poisoned outputs inside a NaN guard region; and HF generate through a HedgehogCache on CUDA."""
from __future__ import annotations

import itertools

import pytest
import torch

import hhfft
from hhfft.kernels.linear_attention.naive import linear_attention_naive
from hhfft.kernels.linear_attention.recurrent import linear_attention_step_triton
from hhfft.lowering.decode import _decode_torch
from tests.utils import assert_within_baseline, linear_features

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

DIMS = [32, 64, 128]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
CASES = [(f, d, g, DTYPES[i % 3], (i % 2) == 1)
         for i, (f, d, g) in enumerate(itertools.product(DIMS, DIMS, [1, 2, 4]))]


@pytest.mark.parametrize("F,D,G,dt,masked", CASES,
                         ids=[f"F{f}-D{d}-G{g}-{str(dt)[6:]}" + ("-mask" if m else "") for f, d, g, dt, m in CASES])
def test_step_kernel(F, D, G, dt, masked):
    B, Hkv, T = 3, 2, 5
    Hq = Hkv * G
    q, k, v, keep = linear_features(B, Hq, Hkv, T, F, D, masked, seed=F * 1000 + D * 10 + G)
    ref = linear_attention_naive(q, k, v, causal=True, key_mask=keep)
    S, z = torch.zeros(B, Hkv, F, D, device="cuda"), torch.zeros(B, Hkv, F, device="cuda")
    bS, bz = S.clone(), z.clone()
    for t in range(T):
        qt, kt, vt = (x[:, :, t].to("cuda", dt).contiguous() for x in (q, k, v))
        kp = None if keep is None else keep[:, t].cuda()
        guard = torch.full((3 * B * Hq * D,), float("nan"), dtype=dt, device="cuda")
        out = guard[B * Hq * D: 2 * B * Hq * D].view(B, Hq, D)
        o = linear_attention_step_triton(qt, kt, vt, S, z, kp, wrap=False, out=out)
        assert torch.isnan(guard[: B * Hq * D]).all() and torch.isnan(guard[2 * B * Hq * D:]).all(), "out of bounds"
        base = _decode_torch(qt[:, :, None], kt[:, :, None], vt[:, :, None], bS, bz,
                             None if kp is None else kp[:, None])[:, :, 0]
        naive = linear_attention_naive(*(x[:, :, : t + 1].to("cuda", dt).float() for x in (q, k, v)), causal=True,
                                       key_mask=None if keep is None else keep[:, : t + 1].cuda())[:, :, -1].to(dt)
        assert_within_baseline(f"o step {t}", o.cpu(), ref[:, :, t], [base.cpu(), naive.cpu()])
    kept = torch.ones(B, T, dtype=torch.bool) if keep is None else keep
    kk, vv = (torch.where(kept[:, None, :, None], x, 0).to(dt).double() for x in (k, v))  # as the kernel saw them
    assert_within_baseline("state", S.cpu(), kk.transpose(-1, -2) @ vv, [bS.cpu()], dtype=torch.float32)


def test_generate_on_cuda():
    transformers = pytest.importorskip("transformers")
    from hhfft.convert.decode import HedgehogCache

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=64,
                                  initializer_range=0.2)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(1, 64, (2, 20))
    hhfft.convert(model, {"input_ids": ids, "use_cache": False})
    model.cuda()
    ids = ids.cuda()
    out = model.generate(ids, past_key_values=HedgehogCache(model), max_new_tokens=4, do_sample=False,
                         pad_token_id=0)
    seq = ids
    with torch.no_grad():
        for _ in range(4):
            seq = torch.cat([seq, model(input_ids=seq, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, seq), f"{out[:, 20:].tolist()} != {seq[:, 20:].tolist()}"
