"""Converted HF models (the conversion tests' tiny random BERT, GPT-2 and Llama with GQA) on CUDA in bf16 under
torch.compile(backend="hhfft"): the generated code calls the hhfft linear-attention kernels (feature map and chunk
kernels, forward and backward), and the output and the gradients of the maps are within the STYLE rule of the fp64
CPU path: error <= 2x PyTorch's own at bf16, PyTorch's own being the same converted model in bf16 on CUDA run eagerly
on the plain-torch path (HHFFT_LINEAR_ATTENTION_TRITON=0)."""
from __future__ import annotations

import copy

import pytest
import torch

import hhfft  # noqa: F401  (registers the backend and the ops)
from hhfft.convert import convert
from utils import assert_within_baseline

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _model(family):
    transformers = pytest.importorskip("transformers")

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    common = dict(vocab_size=64, max_position_embeddings=256, attn_implementation="sdpa", initializer_range=0.2)
    if family == "bert":
        cfg = transformers.BertConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                                      **common)
        return transformers.BertModel(cfg), False
    if family == "gpt2":
        cfg = transformers.GPT2Config(n_embd=256, n_layer=2, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=0,
                                      **common)
        return transformers.GPT2Model(cfg), True
    cfg = transformers.LlamaConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=256, **common)
    return transformers.LlamaModel(cfg), True


def _run(model, inputs):
    """Output and the gradients of every feature-map parameter of loss = sum(out * w) (w fixed)."""
    model.zero_grad(set_to_none=True)
    out = model(**inputs).last_hidden_state
    w = torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)
    (out.float() * w).sum().backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.detach().clone() for n, p in model.named_parameters()
             if "hedgehog" in n}
    return out.detach(), grads


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_converted_model_compiled_on_cuda_calls_the_kernels_and_matches(family, monkeypatch):
    from torch._inductor.utils import run_and_get_code

    model, decoder = _model(family)
    B, L = 2, 200  # several 64-token chunks, the last one partial
    ids = torch.randint(0, 64, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 150:] = 0  # key padding on the second sequence
    inputs = {"input_ids": ids, "attention_mask": mask} | ({"use_cache": False} if decoder else {})
    report = convert(model, inputs)
    assert report.count("hedgehog", "rewritten") == 2, str(report)

    ref_model = copy.deepcopy(model).double()
    ref_out, ref_grads = _run(ref_model, inputs)  # fp64 on the CPU: the referee

    cuda_inputs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in inputs.items()}
    eager = copy.deepcopy(model).cuda().to(torch.bfloat16)
    monkeypatch.setenv("HHFFT_LINEAR_ATTENTION_TRITON", "0")
    base_out, base_grads = _run(eager, cuda_inputs)  # PyTorch's own computation at bf16
    monkeypatch.delenv("HHFFT_LINEAR_ATTENTION_TRITON")  # the default: the kernels for bf16

    compiled_model = copy.deepcopy(model).cuda().to(torch.bfloat16)
    compiled = torch.compile(compiled_model, backend="hhfft")
    (out, grads), codes = run_and_get_code(lambda: _run(compiled, cuda_inputs))
    code = "\n".join(codes)
    for kernel in ("hedgehog_feature_map_fwd_kernel", "linear_attention_fwd_kernel", "linear_attention_bwd_dq_kernel",
                   "linear_attention_bwd_dkdv_kernel", "hedgehog_feature_map_bwd_kernel"):
        assert kernel in code, f"{kernel} is not in the generated code"

    keep = mask.bool()[..., None]  # padded positions' outputs are not compared (BERT gives them arbitrary values)
    assert_within_baseline("output", torch.where(keep, out.cpu(), 0), torch.where(keep, ref_out, 0),
                           [torch.where(keep, base_out.cpu(), 0)], dtype=torch.bfloat16)
    assert sorted(grads) == sorted(ref_grads) and grads
    for name in ref_grads:
        assert_within_baseline(f"d {name}", grads[name].cpu(), ref_grads[name], [base_grads[name].cpu()],
                               dtype=torch.bfloat16)
