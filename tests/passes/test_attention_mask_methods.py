"""The mask proof reads operators however Dynamo records them.

torch 2.11's Dynamo records some comparisons inside transformers' mask functions as Tensor methods (``a.__eq__(b)``,
``call_method``) where torch 2.13 records ``operator.eq`` (``call_function``); a converted GPT-2 then lost its
causal proof on the GPU image. The torch here records functions, so the test rewrites the recorded graph into the
method spelling and checks that the proof is unchanged.
"""
import operator

import pytest
import torch
import torch.nn.functional as F

from hhfft.passes.attention import _record_sdpa
from hhfft.passes.attention_mask import MaskAnalyzer

_AS_METHOD = {operator.eq: "__eq__", operator.ne: "__ne__", operator.le: "__le__", operator.lt: "__lt__",
              operator.ge: "__ge__", operator.gt: "__gt__", operator.and_: "__and__", operator.add: "__add__",
              operator.sub: "__sub__", operator.mul: "__mul__"}


def _causal_same_document(q, k, v):
    # the structure of transformers' sdpa_mask: causal AND "same packed sequence" (both sides constant here)
    L = q.shape[2]
    qi = (torch.arange(L) + 0)[None, None, :, None]
    ki = (torch.arange(L) + 0)[None, None, None, :]
    doc = torch.zeros(1, L, dtype=torch.long).cumsum(-1)
    same = doc[:, None, :, None] == doc[:, None, None, :]
    keep = ((ki <= qi) & same) & (ki - 1 < qi * 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep.expand(q.shape[0], -1, L, L))


def _key_padding_ne(q, k, v, pad):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=(pad != 0)[:, None, None, :])


def _graph(fn, *args):
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=keep, fullgraph=True)(*args)
    return graphs[0]


def _mask_kind(gm) -> str:
    (sdpa,) = [n for n in gm.graph.nodes if n.target is torch._C._nn.scaled_dot_product_attention]
    return _record_sdpa(sdpa, MaskAnalyzer()).mask_kind


@pytest.mark.parametrize("fn, expected", [(_causal_same_document, "causal"), (_key_padding_ne, "key_padding")])
def test_method_spelling_of_operators_keeps_the_proof(fn, expected):
    q = torch.randn(2, 2, 9, 8)
    args = (q, q, q) if fn is _causal_same_document else (q, q, q, torch.tensor([[1] * 9, [1] * 5 + [0] * 4]))
    gm = _graph(fn, *args)
    assert _mask_kind(gm) == expected  # as recorded here (functions)
    moved = 0
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in _AS_METHOD:
            n.op, n.target = "call_method", _AS_METHOD[n.target]
            moved += 1
    assert moved >= 1
    assert _mask_kind(gm) == expected  # as torch 2.11 records them (methods)
