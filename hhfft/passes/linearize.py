"""SDPA sites of converted modules -> Hedgehog linear attention (lossy: only where the model was converted).

Runs after the attention pass, on the sites it recorded (every softmax attention is then one SDPA node). A
converted owner module (``hhfft.convert``) announces its feature maps with a marker node
``hhfft::hedgehog_site(wq, bq, wk, bk, kind, index, window, mix, sinks, lse)`` traced from its forward; the
marker's inputs are the maps' parameters (graph inputs under Dynamo). The pass pairs marker ``index`` of an owner
with that owner's ``index``-th attention site (graph order) and, when the site's mask was proved to be none /
causal / key padding / both and the query and key lengths are equal, replaces the SDPA call by

    hedgehog_attention(q, k, v, wq, bq, wk, bk, kind, causal, key_mask, window, mix, scale, sinks, lse)

(``hhfft.convert.modules``: Hedgehog linear attention, or the sliding-window or sink hybrid when the site has a
window or sinks)

with ``key_mask`` [B, S] read from the SDPA mask's last query row (the mask is proved to be 0 / -inf-like except on
padded keys and, if causal, above the diagonal, so that row is exactly the keys' keep mask). Other sites stay
softmax and are reported with the reason. Every marker is erased.

``mode="tap"`` (distillation) keeps softmax attention and inserts, after each SDPA it pairs, a call that computes
the site's attention-transfer loss from the same q, k (see ``hhfft.convert.distill``).
"""
from __future__ import annotations

import collections
from typing import Any, Optional

import torch
import torch.fx as fx

from hhfft.passes import decode
from hhfft.passes._fx import arg, bump, insert_call, known_eq, replace_node, val
from hhfft.passes.report import Site, describe_shape, module_path

__all__ = ["run", "is_marker", "key_mask_from_attn_mask", "LINEARIZABLE"]

LINEARIZABLE = ("none", "causal", "key_padding", "causal+key_padding")


def is_marker(n: fx.Node) -> bool:
    if n.op != "call_function":
        return False
    t = n.target
    name = getattr(t, "_name", None) or getattr(getattr(t, "_schema", None), "name", None)
    if name is None and isinstance(t, torch._ops.OpOverloadPacket):
        name = t._qualified_op_name
    return name == "hhfft::hedgehog_site"


def key_mask_from_attn_mask(mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[B, S] bool keep-mask of keys from an SDPA mask proved to be key padding (and maybe causal): its last query
    row. Bool masks: True = attend; additive masks: 0 = attend (the others are -inf or finfo.min)."""
    allowed = mask if mask.dtype == torch.bool else mask == 0
    while allowed.dim() < 4:
        allowed = allowed.unsqueeze(0)
    row = allowed[:, 0, -1, :]
    return row.expand(q.shape[0], k.shape[-2]).contiguous()


def _hedgehog(q, k, v, wq, bq, wk, bk, kind: str, causal: bool, key_mask: Optional[torch.Tensor], window: int = 0,
              mix: Optional[torch.Tensor] = None, scale: Any = None, sinks: int = 0,
              lse: Optional[torch.Tensor] = None):
    from hhfft.convert.modules import hedgehog_attention

    return hedgehog_attention(q, k, v, wq, bq, wk, bk, kind, causal, key_mask, window, mix, scale, sinks, lse)


def _tap(q, k, v, out, mask, wq, bq, wk, bk, kind: str, is_causal: bool, scale: Any, site: str, window: int = 0,
         mix: Optional[torch.Tensor] = None, sinks: int = 0, lse: Optional[torch.Tensor] = None) -> None:
    from hhfft.convert.distill import record_tap

    record_tap(site, q, k, v, out, mask, wq, bq, wk, bk, kind, is_causal, scale, window, mix, sinks, lse)


def _sdpa_parts(n: fx.Node) -> dict:
    return {
        "q": n.args[0], "k": n.args[1], "v": n.args[2],
        "mask": arg(n, 3, "attn_mask"), "dropout": arg(n, 4, "dropout_p", 0.0), "is_causal": arg(n, 5, "is_causal", False),
        "scale": n.kwargs.get("scale", n.args[6] if len(n.args) > 6 else None),
    }


def _record(report: Any, site: Any, path: str, decision: str, reason: str) -> None:
    shapes = "-"
    dtype = "-"
    if site is not None and site.sdpa is not None:
        try:
            shapes = describe_shape(*(val(x) for x in site.sdpa.args[:3]))
            dtype = str(val(site.sdpa.args[0]).dtype).replace("torch.", "")
        except Exception:  # noqa: BLE001 - the description is informative only
            pass
    report.add(Site(kind="hedgehog", spelling=getattr(site, "spelling", "-") if site is not None else "-",
                    module_path=path, shapes=shapes, dtype=dtype, decision=decision, reason=reason, record=site))


def _check_maps(path: str, index: int, wq: Any, wk: Any, q: Any, k: Any) -> None:
    vq, vk, tq, tk = val(wq), val(wk), val(q), val(k)
    if not all(isinstance(x, torch.Tensor) for x in (vq, vk, tq, tk)):
        return
    if not (known_eq(vq.shape[0], tq.shape[1]) and known_eq(vq.shape[1], tq.shape[-1])
            and known_eq(vk.shape[0], tk.shape[1]) and known_eq(vk.shape[1], tk.shape[-1])):
        raise ValueError(
            f"hhfft linearize: the feature maps of site {index} of {path or '<root>'!r} are for q heads x dim "
            f"{tuple(vq.shape[:2])} and k heads x dim {tuple(vk.shape[:2])}, but the site's q is "
            f"{tuple(tq.shape)} and k is {tuple(tk.shape)} ([B, H, L, D]); the model does not match its conversion: "
            "convert it again (hhfft.convert) or load a checkpoint made for this model"
        )


def run(gm: fx.GraphModule, opts: Any, report: Any, mode: str = "linear") -> None:
    """Replace the paired SDPA sites by Hedgehog attention (``mode="linear"``) or tap them (``mode="tap"``)."""
    if mode not in ("linear", "tap"):
        raise ValueError(f"linearize.run: mode must be 'linear' or 'tap', got {mode!r}")
    g = gm.graph
    markers = [n for n in g.nodes if is_marker(n)]
    if not markers:
        return
    if getattr(opts, "attention", "canonical") == "keep":
        # the attention pass left every site as written: the owner's sites are not the canonical SDPA calls the
        # feature maps were paired with at conversion (numbering them here would pair maps with other sites)
        for m in markers:
            g.erase_node(m)
            _record(report, None, module_path(m), "skipped", "attention='keep' leaves attention as written; Hedgehog "
                                                             "needs the canonical sites (attention='canonical')")
            bump("hedgehog_skipped")
        return
    by_owner: dict = collections.defaultdict(list)
    for s in report.select("attention"):
        rec = s.record
        if rec is not None and rec.sdpa is not None and s.decision != "skipped" and rec.sdpa.graph is g:
            by_owner[rec.owner if rec.owner is not None else s.module_path].append(rec)
    for m in markers:
        path = module_path(m)
        wq, bq, wk, bk, kind, index = m.args[:6]
        window, mix = arg(m, 6, "window", 0), arg(m, 7, "mix", None)
        sinks, lse = arg(m, 8, "sinks", 0), arg(m, 9, "lse", None)
        sites = by_owner.get(path, [])
        site = sites[index] if index < len(sites) else None
        g.erase_node(m)
        if site is None:
            _record(report, None, path, "skipped", f"the owner has feature maps for site {index} but its forward "
                                                   f"has {len(sites)} attention site(s)")
            bump("hedgehog_skipped")
            continue
        n = site.sdpa
        p = _sdpa_parts(n)
        # the site's own q, k, v and mask: not the blank-row guard's (passes/attention.py), nor k, v repeated per head
        p.update(q=site.q, k=site.k, v=site.v, mask=site.attn_mask)
        if mode == "linear" and decode.rewrite(g, site, p, (wq, bq, wk, bk, kind, window, sinks), path,
                                               lambda d, r: _record(report, site, path, d, r)):
            continue  # it reads a HedgehogCache layer: constant-state decoding (passes/decode.py)
        if site.mask_kind not in LINEARIZABLE:
            _record(report, site, path, "skipped", f"mask is {site.mask_kind}: neither causal nor key padding; stays "
                                                   "softmax")
            bump("hedgehog_skipped")
            continue
        tq, tk = val(p["q"]), val(p["k"])
        if not known_eq(tq.shape[-2], tk.shape[-2]):
            _record(report, site, path, "skipped", "query and key lengths differ (cross-attention or a KV cache): "
                                                   "stays softmax")
            bump("hedgehog_skipped")
            continue
        _check_maps(path, index, wq, wk, p["q"], p["k"])
        key_padding = "key_padding" in site.mask_kind
        if key_padding and not isinstance(p["mask"], fx.Node):
            _record(report, site, path, "skipped", "key padding proved but the SDPA call has no mask tensor")
            bump("hedgehog_skipped")
            continue
        with g.inserting_after(n):
            if mode == "tap":
                tap = g.call_function(_tap, (p["q"], p["k"], p["v"], n, p["mask"], wq, bq, wk, bk, kind,
                                             bool(p["is_causal"]), p["scale"], f"{path}#{index}", window, mix,
                                             sinks, lse))
                tap.meta.update({k: n.meta[k] for k in ("nn_module_stack", "stack_trace") if k in n.meta})
                _record(report, site, path, "kept", "softmax teacher, distillation tap")
                bump("hedgehog_tapped")
                continue
            km = insert_call(g, key_mask_from_attn_mask, (p["mask"], p["q"], p["k"]), like=n) if key_padding else None
        with g.inserting_after(km if km is not None else n):
            out = insert_call(g, _hedgehog, (p["q"], p["k"], p["v"], wq, bq, wk, bk, kind, bool(site.causal), km,
                                             window, mix, p["scale"], sinks, lse), like=n)
        site.sdpa = replace_node(g, n, out)
        drop = p["dropout"]
        reason = (f"hedgehog + softmax window {window}" if window else
                  f"hedgehog + {sinks} softmax sink(s)" if sinks else "hedgehog linear attention") + (
            " (causal)" if site.causal else "") + (
            " (key mask)" if key_padding else "")
        if isinstance(drop, (int, float)) and drop > 0:
            reason += f"; attention dropout p={drop} dropped"
        _record(report, site, path, "rewritten", reason)
        bump("hedgehog_linearized")
