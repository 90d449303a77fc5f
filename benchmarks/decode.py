"""Decoding throughput: a GPT-2-small-sized model with softmax attention and its KV cache vs the same model with
Hedgehog linear attention and its constant-size state, at 8K and 32K tokens of context.

What it measures. One greedy decode step (embed -> 12 blocks -> ln_f -> lm_head -> argmax) for a batch of
sequences that each already hold CONTEXT tokens, captured in a CUDA graph (so no Python or launch overhead is timed)
and replayed; tokens/s = batch x steps / time. Both models run the SAME step code on the same HF GPT2LMHeadModel
modules (12 layers, width 768, 12 heads, bf16, random weights); only attention differs:
  - softmax:  the new k, v written into a static KV cache [B, 12, CONTEXT, 64] per layer, then
              F.scaled_dot_product_attention(q, K, V) over the CONTEXT cached keys (FlashAttention / SDPA)
  - hedgehog: the model's Hedgehog maps (F = 64 per map -> 128 features, softmax_split) and
              hhfft.lowering.decode.hedgehog_decode on the state S [B, 12, 128, 64], z [B, 12, 128] (fp32): the
              Triton recurrent step kernel; O(1) in the context
Each row is at the largest batch that fits in GPU memory: a descending search from an estimate made from the free
memory and the bytes each sequence needs (state or KV cache, plus activations); every batch tried is recorded.
State bytes per sequence: softmax 2 x layers x CONTEXT x 768 x 2 bytes; hedgehog layers x 12 x (128 x 64 + 128) x 4.

Checks before timing: the step kernel against the plain-torch step at the benchmark's shapes, and the hand-written
Hedgehog step against the converted HF model decoding through hhfft.convert.decode.HedgehogCache (same tokens,
logits within a bf16 tolerance), so the figure is the converted model's decoding, not something else.

    PYTHONPATH=. python benchmarks/decode.py --out $OUT              # the GPU run (about 2 minutes)
    PYTHONPATH=. python benchmarks/decode.py --smoke                  # CPU, tiny sizes, no CUDA graphs
    python benchmarks/decode.py --plot OUT/decode.json --out benchmarks  # the PNG from a run's JSON
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

import hhfft
from hhfft.lowering.decode import _decode_torch, hedgehog_decode

LAYERS, WIDTH, HEADS, VOCAB = 12, 768, 12, 50257
FH = 64  # feature dim per map: phi has 2 x 64 = 128 features
CONTEXTS = [8192, 32768]


def build(layers, width, heads, vocab, positions, device, dtype, convert_with_hhfft, feature_dim):
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=width, n_layer=layers, n_head=heads, n_positions=positions,
                                  vocab_size=vocab, attn_implementation="sdpa")
    model = transformers.GPT2LMHeadModel(cfg).eval()
    conv = copy.deepcopy(model)
    if convert_with_hhfft:  # what a user does (Dynamo capture: seconds per layer on a CPU)
        ids = torch.randint(0, vocab, (1, 8))
        hhfft.convert(conv, {"input_ids": ids, "use_cache": False}, hhfft.HedgehogConfig(feature_dim=feature_dim))
    else:  # the same maps installed directly (no capture): identical modules and parameters
        from hhfft.convert.modules import HedgehogAttention, install, install_root

        for blk in conv.transformer.h:
            install(blk.attn, 0, HedgehogAttention(heads, heads, width // heads, "softmax_split", feature_dim))
        install_root(conv)
    for m in (model, conv):
        m.to(device=device, dtype=dtype)
        for blk in m.transformer.h:  # perturb the maps away from identity so they are not a special case
            hh = getattr(blk.attn, "hedgehog", None)
            if hh is not None:
                with torch.no_grad():
                    g = torch.Generator().manual_seed(1)
                    for p in hh.parameters():
                        p.add_(0.05 * torch.randn(p.shape, generator=g).to(p))
    return model, conv


class Step:
    """One greedy decode step for B sequences at position ``pos`` (a 1-element long tensor), in place: reads
    ``tok`` [B], writes the next token into ``tok``."""

    def __init__(self, model, kind, B, context, device):
        self.m, self.kind, self.B, self.ctx = model.transformer, kind, B, context
        self.head = model.lm_head
        self.H = self.m.config.n_head
        self.D = self.m.config.n_embd // self.H
        dt = self.m.wte.weight.dtype
        self.tok = torch.zeros(B, dtype=torch.long, device=device)
        self.pos = torch.full((1,), context - 1, dtype=torch.long, device=device)
        self.cache = []
        for blk in self.m.h:
            if kind == "softmax":
                kv = [torch.zeros(B, self.H, context, self.D, dtype=dt, device=device) for _ in range(2)]
            else:
                Fd = blk.attn.hedgehog.k_map.out_features
                kv = [torch.zeros(B, self.H, Fd, self.D, dtype=torch.float32, device=device),
                      torch.zeros(B, self.H, Fd, dtype=torch.float32, device=device)]
            self.cache.append(kv)

    def state_bytes_per_seq(self):
        return sum(t[0].numel() * t.element_size() for kv in self.cache for t in kv)

    def __call__(self):
        m, B, H, D = self.m, self.B, self.H, self.D
        x = m.wte(self.tok) + m.wpe(self.pos)  # [B, W]
        for blk, (a, b) in zip(m.h, self.cache):
            q, k, v = blk.attn.c_attn(blk.ln_1(x)).view(B, 3, H, 1, D).unbind(1)  # [B, H, 1, D] each
            if self.kind == "softmax":
                a.index_copy_(2, self.pos, k)
                b.index_copy_(2, self.pos, v)
                o = F.scaled_dot_product_attention(q, a, b)
            else:
                hh = blk.attn.hedgehog
                o = hedgehog_decode(q, k, v, hh.q_map.weight, hh.q_map.bias, hh.k_map.weight, hh.k_map.bias,
                                    hh.kind, a, b)
            x = x + blk.attn.c_proj(o.reshape(B, H * D))
            x = x + blk.mlp(blk.ln_2(x))
        logits = self.head(m.ln_f(x))
        self.tok.copy_(logits.argmax(-1))
        return logits


def check_kernel(device, log):
    """Triton step vs the plain-torch step at the benchmark's shapes (bf16 inputs, fp32 state)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    B, Hh, Fd, D = 8, HEADS, 2 * FH, WIDTH // HEADS
    S0, z0 = torch.rand(B, Hh, Fd, D, generator=g).to(device), torch.rand(B, Hh, Fd, generator=g).to(device)
    q, k = (torch.rand(B, Hh, 1, Fd, generator=g).to(device, torch.bfloat16) for _ in range(2))
    v = torch.randn(B, Hh, 1, D, generator=g).to(device, torch.bfloat16)
    S1, z1, S2, z2 = S0.clone(), z0.clone(), S0.clone(), z0.clone()
    from hhfft.lowering.decode import linear_attention_decode

    o = linear_attention_decode(q, k, v, S1, z1)
    ref = _decode_torch(q, k, v, S2, z2, None)
    ref64 = _decode_torch(q.double(), k.double(), v.double(), S0.double().clone(), z0.double().clone(), None)
    err = ((o.double() - ref64).norm() / ref64.norm()).item()
    base = ((ref.double() - ref64).norm() / ref64.norm()).item()
    serr = ((S1 - S2).abs().max() / S2.abs().max()).item()
    ok = err <= 2 * base + 4 * torch.finfo(torch.bfloat16).eps and serr < 1e-6
    log({"check": "step kernel vs torch", "rel_err": err, "torch_bf16_rel_err": base, "state_rel_err": serr,
         "ok": ok, "triton": o.is_cuda})
    return ok


def check_model(device, dtype, log, layers=2, convert_with_hhfft=True):
    """The hand-written Hedgehog step == the converted HF model decoding with HedgehogCache (small model)."""
    from hhfft.convert.decode import HedgehogCache

    _, conv = build(layers, WIDTH if device == "cuda" else 64, HEADS if device == "cuda" else 4, 512, 64, device,
                    dtype, convert_with_hhfft, FH if device == "cuda" else 8)
    B, P = 2, 12
    ids = torch.randint(0, 512, (B, P), device=device)
    cache = HedgehogCache(conv)
    with torch.no_grad():
        out = conv(input_ids=ids, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1)
        step = Step(conv, "hedgehog", B, P + 1, device)
        for (a, b), layer in zip(step.cache, cache.layers):
            a.copy_(layer.state)
            b.copy_(layer.normalizer)
        ref = conv(input_ids=nxt[:, None], past_key_values=cache, use_cache=True).logits[:, -1]
        step.tok.copy_(nxt)
        got = step()
    err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
    same = bool(torch.equal(got.argmax(-1), ref.argmax(-1)))
    ok = err < (2e-2 if dtype == torch.bfloat16 else 1e-4) and same
    log({"check": "hand-written step vs HF generate path (HedgehogCache)", "layers": layers, "logits_rel_err": err,
         "same_argmax": same, "ok": ok})
    return ok


def try_batch(model, kind, B, context, device, steps):
    """tokens/s of the captured step at batch B, or None when it does not fit."""
    step = None
    try:
        step = Step(model, kind, B, context, device)
        with torch.no_grad():
            if device == "cuda":
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    for _ in range(2):
                        step()
                torch.cuda.current_stream().wait_stream(s)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step()
                run = graph.replay
                for _ in range(2):
                    run()
                torch.cuda.synchronize()
                t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                t0.record()
                for _ in range(steps):
                    run()
                t1.record()
                torch.cuda.synchronize()
                ms = t0.elapsed_time(t1) / steps
                peak = torch.cuda.max_memory_allocated() / 2**30
            else:
                step()
                t = time.perf_counter()
                for _ in range(steps):
                    step()
                ms = (time.perf_counter() - t) * 1e3 / steps
                peak = float("nan")
        return {"ms_per_step": ms, "tokens_per_s": B * 1e3 / ms, "state_bytes_per_seq": step.state_bytes_per_seq(),
                "peak_gib": peak}
    except Exception as e:
        if "out of memory" not in str(e).lower() and not isinstance(e, torch.OutOfMemoryError):
            raise
        return None
    finally:
        del step
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


def search(model, kind, context, device, per_seq_bytes, steps, log, deadline):
    """Largest batch that fits: descend from an estimate by 10% per failure; returns the first that runs."""
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        B = max(1, int(free * 0.97 / per_seq_bytes))
    else:
        B = 4
    tried = []
    while B >= 1 and time.time() < deadline:
        r = try_batch(model, kind, B, context, device, steps)
        tried.append(B)
        if r is not None:
            r.update({"kind": kind, "context": context, "batch": B, "batches_tried": tried})
            log(r)
            return r
        B = int(B * 0.9)
    log({"kind": kind, "context": context, "batch": None, "batches_tried": tried, "error": "nothing fitted in time"})
    return None


def plot(path, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in open(path)]
    rows = [r for r in rows if "tokens_per_s" in r]
    ctxs = sorted({r["context"] for r in rows})
    fig, ax = plt.subplots(figsize=(6, 4))
    w = 0.38
    for i, kind in enumerate(["softmax", "hedgehog"]):
        ys = [next((r["tokens_per_s"] for r in rows if r["kind"] == kind and r["context"] == c), 0) for c in ctxs]
        bars = ax.bar([j + (i - 0.5) * w for j in range(len(ctxs))], ys, w,
                      label={"softmax": "softmax + KV cache (SDPA)", "hedgehog": "Hedgehog + state (hhfft)"}[kind])
        for b, r in zip(bars, [next((r for r in rows if r["kind"] == kind and r["context"] == c), None) for c in ctxs]):
            if r is not None:
                ax.annotate(f"B={r['batch']}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                            va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(ctxs)), [f"{c // 1024}K context" for c in ctxs])
    ax.set_ylabel("tokens / s (largest batch that fits)")
    ax.set_title("GPT-2-small-sized decode step, CUDA graph, H200, bf16")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "decode_throughput.png"), dpi=120)
    print("wrote", os.path.join(out_dir, "decode_throughput.png"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: checks the script end to end")
    ap.add_argument("--contexts", type=int, nargs="*", default=CONTEXTS)
    ap.add_argument("--budget-s", type=float, default=200.0, help="stop searching after this many seconds")
    ap.add_argument("--plot", help="only draw the PNG from a decode.json written by a run")
    args = ap.parse_args()
    if args.plot:
        plot(args.plot, args.out)
        return
    deadline = time.time() + args.budget_s
    os.makedirs(args.out, exist_ok=True)
    jpath = os.path.join(args.out, "decode.json")
    open(jpath, "w").close()

    def log(row):
        row = {"time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), **row}
        print(json.dumps(row), flush=True)
        with open(jpath, "a") as f:
            f.write(json.dumps(row) + "\n")

    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("decode.py: no CUDA device; use --smoke on the CPU")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    import transformers
    import triton

    log({"env": True, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
         "triton": triton.__version__, "transformers": transformers.__version__, "argv": sys.argv})
    ok = True
    if device == "cuda":
        ok &= check_kernel(device, log)
    try:
        ok &= check_model(device, dtype, log, convert_with_hhfft=True)
    except Exception as e:  # noqa: BLE001 - recorded; the timing below does not depend on it
        ok = False
        log({"check": "hand-written step vs HF generate path (HedgehogCache)", "ok": False, "error": repr(e)[:500]})
    if args.smoke:
        layers, width, heads, vocab, contexts, fh = 2, 64, 4, 512, [64, 256], 8
    else:
        layers, width, heads, vocab, contexts, fh = LAYERS, WIDTH, HEADS, VOCAB, args.contexts, FH
    softmax, conv = build(layers, width, heads, vocab, max(contexts) + 64, device, dtype, False, fh)
    steps = 3 if args.smoke else 20
    act = 8 * vocab * 2 + 64 * width * 2  # logits (eager warm-up and graph pool) + [W]-sized activations per sequence
    hh_bytes = layers * heads * (2 * fh * (width // heads) + 2 * fh) * 4
    hh = search(conv, "hedgehog", max(contexts), device, hh_bytes + act, steps, log, deadline)
    rows = [hh]
    for c in contexts:
        kv = 2 * layers * c * width * 2
        rows.append(search(softmax, "softmax", c, device, kv + act, steps, log, deadline))
        if hh is not None and c != max(contexts):  # the state does not depend on the context: same batch
            r = try_batch(conv, "hedgehog", hh["batch"], c, device, steps)
            if r is not None:
                r.update({"kind": "hedgehog", "context": c, "batch": hh["batch"], "batches_tried": [hh["batch"]]})
                log(r)
    log({"done": True, "checks_ok": bool(ok)})


if __name__ == "__main__":
    main()
