"""Attention transfer: identity-initialised maps already correlate with the softmax weights of a converted site,
and distillation lowers the per-site loss on every site (and can draw one head before/after)."""
from __future__ import annotations

import doctest
import io

import pytest
import torch

from hhfft.convert import HedgehogConfig, convert, distill, hedgehog_sites, site_losses
from hhfft.convert.distill import lr_lambda, site_maps, tune_maps
from utils import masked_correlation


def _bert(layers=2):
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=32, initializer_range=0.3)
    return transformers.BertModel(cfg).eval()


def _batches(n, B=4, L=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = torch.ones(B, L, dtype=torch.long)
        mask[-1, L // 2:] = 0
        out.append({"input_ids": torch.randint(0, 64, (B, L), generator=g), "attention_mask": mask})
    return out


def test_identity_maps_correlate_with_softmax_and_distillation_lowers_every_site(tmp_path):
    model = _bert()
    train, held = _batches(4), _batches(2, seed=1)
    convert(model, held[0], HedgehogConfig())
    for i in range(len(hedgehog_sites(model))):
        a_true, a_pred, allowed = site_maps(model, held[0], site=i)
        assert masked_correlation(a_true, a_pred, allowed) > 0.5, i
        assert torch.allclose(a_pred.sum(-1), torch.ones(()), atol=1e-5)  # normalised over the kept keys
        assert (a_pred[~allowed] == 0).all()  # masked like the teacher
    log = io.StringIO()
    png = tmp_path / "pictures" / "maps.png"  # a folder that does not exist yet: made before the distillation
    res = distill(model, train, steps=25, lr=3e-2, eval_batches=held, stream=log, log_every=5, picture=str(png))
    assert set(res.before) == set(res.after) == {f"encoder.layer.{i}.attention.self#0" for i in range(2)}
    for site in res.before:
        assert res.after[site] < res.before[site] - 0.05, (site, res.before[site], res.after[site])
    assert res.after == site_losses(model, held)
    assert "distill step 25/25" in log.getvalue() and len(res.history) == 25
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # original weights were frozen during distillation and are trainable again afterwards; no stale gradients
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_output_mse_term_and_frozen_weights():
    model = _bert(layers=1)
    before = {k: v.clone() for k, v in model.state_dict().items() if "hedgehog" not in k}
    batches = _batches(2)
    convert(model, batches[0])
    res = distill(model, batches, steps=3, lr=1e-2, output_mse=1.0, stream=None)
    assert len(res.history) == 3 and all(torch.isfinite(torch.tensor(res.history)))
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not torch.equal(after["encoder.layer.0.attention.self.hedgehog.q_map.weight"],
                           torch.eye(8).expand(4, 8, 8))


def test_lr_schedule_warmup_and_cosine():
    f = lr_lambda("cosine", steps=10, warmup=2)
    got = [f(i) for i in range(11)]
    assert got[0] == pytest.approx(0.5) and got[1] == pytest.approx(1.0) and got[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(got[2:], got[3:])) and got[10] == pytest.approx(0.0, abs=1e-12)
    assert all(lr_lambda("constant", 10)(i) == 1.0 for i in range(10))
    with pytest.raises(ValueError, match="'constant' or 'cosine'"):
        lr_lambda("linear", 10)
    with pytest.raises(ValueError, match="warmup must be a non-negative int"):
        lr_lambda("cosine", 10, warmup=-1)


def test_errors_say_what_was_expected():
    model = _bert(layers=1)
    batches = _batches(1)
    for fn, args in ((distill, ()), (tune_maps, (lambda m, b: None,))):
        name = fn.__name__
        with pytest.raises(ValueError, match=f"{name}: the model has no Hedgehog sites; run .*convert"):
            fn(model, batches, *args, steps=1)
    convert(model, batches[0])
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    for fn, args in ((distill, ()), (tune_maps, (lambda m, b: None,))):
        name = fn.__name__
        with pytest.raises(ValueError, match=f"{name}: steps must be a non-negative int, got 1.5"):
            fn(model, batches, *args, steps=1.5)
        with pytest.raises(ValueError, match=f"{name}: no batches given"):
            fn(model, [], *args, steps=1)
    with pytest.raises(ValueError, match=r"picture_site.*site 3 does not exist; the model has 1 converted sites"):
        distill(model, batches, steps=1, picture="x.png", picture_site=3)
    with pytest.raises(ValueError, match="tune_maps: loss_fn must return a scalar tensor .* got float"):
        tune_maps(model, batches, lambda m, b: 1.0, steps=1, stream=None)
    # a refused call leaves the model as it was: weights, requires_grad, eval mode
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    assert all(p.requires_grad for p in model.parameters()) and not model.training


def test_docstring_examples_run():
    import importlib

    module = importlib.import_module("hhfft.convert.distill")  # the attribute hhfft.convert.distill is the function
    result = doctest.testmod(module, extraglobs={"torch": torch}, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0, result
