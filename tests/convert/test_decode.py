"""Constant-state decoding of converted HF causal LMs: ``generate`` with a HedgehogCache gives the greedy tokens of
the same converted model run without a cache over the whole prefix at every step; logits within the tolerance rule
(the fp64 converted model as the referee, where one exists); mixed models (a layer kept softmax keeps its KV cache);
clear refusals; the same decoding under ``torch.compile(backend="hhfft")``."""
from __future__ import annotations

import copy
import inspect

import pytest
import torch

import hhfft
from tests.utils import assert_within_baseline

transformers = pytest.importorskip("transformers")
from hhfft.convert.decode import HedgehogCache, HedgehogLayer

NEW = 5


def _lm(family, impl, layers=2):
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    if family == "gpt2":
        cfg = transformers.GPT2Config(n_embd=32, n_layer=layers, n_head=4, n_positions=128, vocab_size=64,
                                      initializer_range=0.2, attn_implementation=impl)
        return transformers.GPT2LMHeadModel(cfg).eval()
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=48, vocab_size=64,
                                   max_position_embeddings=128, initializer_range=0.2, attn_implementation=impl)
    return transformers.LlamaForCausalLM(cfg).eval()


def _prompt(B, L, pad):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 64, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    if pad:
        mask[0, :pad], ids[0, :pad] = 0, 0  # left padding, as for batched generation
    return ids, mask


def _positions(am):
    """The position ids HF generate gives a left-padded batch (it does so for models whose forward names them)."""
    return (am.cumsum(-1) - 1).masked_fill(am == 0, 1)


def _greedy_without_cache(model, ids, mask, n):
    seq, am = ids, mask
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=seq, attention_mask=am, position_ids=_positions(am), use_cache=False).logits[:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
            am = torch.cat([am, am.new_ones(am.shape[0], 1)], 1)
    return seq, am


CASES = [  # (family, attention implementation, layers, prompt length, left padding, layers kept softmax, new tokens)
    ("gpt2", "sdpa", 1, 70, 3, (), 3),  # a prompt longer than one chunk (64) goes through the chunked form
    pytest.param("gpt2", "eager", 2, 70, 3, (), NEW, marks=pytest.mark.slow),
    pytest.param("llama", "eager", 2, 9, 2, (0,), NEW, marks=pytest.mark.slow),  # GQA, eager spelling, mixed cache
    pytest.param("llama", "sdpa", 2, 9, 2, (0,), NEW, marks=pytest.mark.slow),  # GQA through repeat_kv -> SDPA
]


@pytest.mark.parametrize("family,impl,layers,L,pad,softmax_layers,new", CASES,
                         ids=["gpt2-sdpa-1layer-L70-pad3", "gpt2-eager-L70-pad3", "llama-eager-L9-pad2-mixed",
                              "llama-sdpa-L9-pad2-mixed"])
def test_generate_matches_full_prefix(family, impl, layers, L, pad, softmax_layers, new):
    model = _lm(family, impl, layers)
    ids, mask = _prompt(2, L, pad)
    cfg = hhfft.HedgehogConfig(exclude=tuple(f"*.{i}.*" for i in softmax_layers))
    report = hhfft.convert(model, {"input_ids": ids, "attention_mask": mask, "use_cache": False}, config=cfg)
    assert report.count("hedgehog", "rewritten") == layers - len(softmax_layers), str(report)
    # generate passes position ids (left padding), the mask and logits_to_keep only to a forward that names them
    assert {"position_ids", "attention_mask"} <= set(inspect.signature(model.forward).parameters)
    cache = HedgehogCache(model)
    assert [isinstance(layer, HedgehogLayer) for layer in cache.layers] == [i not in softmax_layers for i in range(layers)]
    out = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=new, do_sample=False,
                         pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    want, am = _greedy_without_cache(model, ids, mask, new)
    assert torch.equal(out.sequences, want), f"cached {out.sequences[:, L:].tolist()} != {want[:, L:].tolist()}"
    # every graph Dynamo made (the prompt's, then the steps') decodes each Hedgehog layer
    n_hh, decoded = layers - len(softmax_layers), torch._dynamo.utils.counters["hhfft"]["hedgehog_decode"]
    assert decoded >= 2 * n_hh and decoded % n_hh == 0, f"{decoded} decode rewrites for {n_hh} Hedgehog layers"
    # constant size: after L + new - 1 tokens each Hedgehog state is still [B, H, 2 x head_dim, head_dim]
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    sizes = [layer.state.shape for layer in cache.layers if isinstance(layer, HedgehogLayer)]
    assert all(s[2:] == (2 * head_dim, head_dim) for s in sizes), sizes
    assert cache.get_seq_length() == L + new - 1
    if family == "llama" and impl == "eager":
        # no fp64 referee: Llama's eager attention rounds its softmax to fp32, so in fp64 the attention pass keeps
        # those sites softmax (the fp64 model would be the unconverted one); the tokens above are this case's check
        return
    # logits: error against the fp64 model at most 2x that of the fp32 model run over the whole prefix
    ref64 = copy.deepcopy(model).double()
    with torch.no_grad():
        full32 = model(input_ids=want, attention_mask=am, position_ids=_positions(am), use_cache=False).logits
        torch._dynamo.utils.counters.clear()
        full64 = ref64(input_ids=want, attention_mask=am, position_ids=_positions(am), use_cache=False).logits
    assert torch._dynamo.utils.counters["hhfft"]["hedgehog_linearized"] == n_hh, "the fp64 referee is not converted"
    for t, lg in enumerate(out.logits):
        pos = L - 1 + t
        assert_within_baseline(f"logits step {t}", lg, full64[:, pos], [full32[:, pos]])


def test_decode_refusals():
    plain = _lm("gpt2", "sdpa", layers=1)
    with pytest.raises(ValueError, match="no Hedgehog sites; convert it first"):
        HedgehogCache(plain)
    ids, _ = _prompt(1, 6, 0)
    hhfft.convert(plain, {"input_ids": ids, "use_cache": False})
    cache = HedgehogCache(plain)
    with torch.no_grad():
        plain(input_ids=ids, past_key_values=cache, use_cache=True)
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.crop(3)
    # several new tokens on top of a state: HF's mask over past + new keys is not proved causal here, so refuse
    with pytest.raises(Exception, match="needs causal attention"), torch.no_grad():
        plain(input_ids=ids[:, :2], past_key_values=cache, use_cache=True)
    # the converted model compiled with another backend: the cache's keys must not silently serve softmax attention
    other = torch.compile(plain, backend="eager")
    with pytest.raises(Exception, match="not rewritten to constant-state Hedgehog decoding"), torch.no_grad():
        other(input_ids=ids, past_key_values=HedgehogCache(plain), use_cache=True)


def test_reset_cache_takes_a_new_batch():
    """reset() forgets the tokens and the batch size: the old state kept its shape, so a batch of another size on a
    reset cache failed deep inside Dynamo."""
    model = _lm("gpt2", "sdpa", layers=1)
    ids, mask = _prompt(3, 6, 0)
    hhfft.convert(model, {"input_ids": ids, "attention_mask": mask, "use_cache": False})
    cache = HedgehogCache(model)
    model.generate(ids[:2], attention_mask=mask[:2], past_key_values=cache, max_new_tokens=2, do_sample=False,
                   pad_token_id=0)
    cache.reset()
    assert cache.get_seq_length() == 0
    got = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=2, do_sample=False,
                         pad_token_id=0)
    fresh = model.generate(ids, attention_mask=mask, past_key_values=HedgehogCache(model), max_new_tokens=2,
                           do_sample=False, pad_token_id=0)
    assert torch.equal(got, fresh)


@pytest.mark.slow
def test_decode_under_the_hhfft_backend():
    """torch.compile(model, backend="hhfft") (Inductor, functionalised state updates) decodes like the eager path:
    logits and state against the fp64 model decoding eagerly, within 2x the eager fp32 path's error."""
    model = _lm("gpt2", "sdpa", layers=1)
    ids, _ = _prompt(2, 9, 0)
    hhfft.convert(model, {"input_ids": ids, "use_cache": False})
    model64 = copy.deepcopy(model).double()
    eager_cache, comp_cache, cache64 = HedgehogCache(model), HedgehogCache(model), HedgehogCache(model64)
    comp = torch.compile(model, backend="hhfft")
    with torch.no_grad():
        for step in range(3):
            a = model(input_ids=ids, past_key_values=eager_cache, use_cache=True).logits
            b = comp(input_ids=ids, past_key_values=comp_cache, use_cache=True).logits
            ref = model64(input_ids=ids, past_key_values=cache64, use_cache=True).logits
            assert_within_baseline(f"logits step {step}", b, ref, [a])
            assert_within_baseline(f"state step {step}", comp_cache.layers[0].state, cache64.layers[0].state,
                                   [eager_cache.layers[0].state])
            ids = a[:, -1:].argmax(-1)
