"""``hhfft.convert``: find every attention site of a model and install Hedgehog feature maps on it, in place."""
from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch
from torch import nn

from hhfft.convert.modules import (
    _REPORTS,
    HedgehogAttention,
    HedgehogConfig,
    hedgehog_sites,
    install,
    install_root,
    select_sites,
    site_name,
    uninstall,
)
from hhfft.passes._fx import as_int
from hhfft.passes.report import Report, Site

__all__ = ["convert", "capture", "call_model", "attention_sites"]


def call_model(model: Any, inputs: Any) -> Any:
    """model(*inputs) for a tuple/list, model(**inputs) for a dict, model(inputs) for a tensor."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def capture(model: nn.Module, example_inputs: Any) -> Report:
    """The attention (and long-conv) sites hhfft finds in ``model`` on these inputs, nothing rewritten for real:
    one Dynamo capture with the passes and no Inductor; the model runs once under no_grad."""
    from hhfft.lowering.backend import Options
    from hhfft.lowering.backend import capture as capture_graphs

    return capture_graphs(model, lambda compiled: call_model(compiled, example_inputs),
                          Options(longconv=False, linearize=False))


def attention_sites(report: Report) -> list:
    """(Site, AttentionSite) of every attention site with an SDPA node (after the canonical rewrite), in order."""
    return [(s, s.record) for s in report.select("attention")
            if s.decision != "skipped" and s.record is not None and s.record.sdpa is not None]


def _owner_index(found: list) -> list:
    """For each site, its index among the sites of the same owner (in the same graph)."""
    seen: dict = {}
    out = []
    for s, rec in found:
        key = (s.graph_id, rec.owner)
        out.append(seen.get(key, 0))
        seen[key] = seen.get(key, 0) + 1
    return out


def _resolve(model: nn.Module, rec: Any) -> tuple:
    """(owner module, its path under ``model``) of a site. Dynamo's paths may start with the name of the frame's
    argument holding the model ("args.0." when a decorator wraps forward): drop leading components until the path
    names a module of the recorded type."""
    stack = rec.sdpa.meta.get("nn_module_stack") if rec.sdpa is not None else None
    want = list(stack.values())[-1][1] if stack else None
    parts = rec.owner.split(".") if rec.owner else []
    for i in range(len(parts) + 1):
        path = ".".join(parts[i:])
        try:
            m = model.get_submodule(path)
        except AttributeError:
            continue
        if want is None or not isinstance(want, type) or isinstance(m, want):
            return m, path
    return None, rec.owner


def _param_like(owner: nn.Module) -> dict:
    for p in owner.parameters():
        if p.is_floating_point():
            return {"device": p.device, "dtype": p.dtype}
    return {}


def convert(model: nn.Module, example_inputs: Any, config: Optional[HedgehogConfig] = None) -> Report:
    """Install Hedgehog feature maps on the attention sites of ``model``, in place, and return the report.

    After it, the model's eager forward and ``torch.compile(model, backend="hhfft")`` both compute Hedgehog linear
    attention at the converted sites (identity-initialised maps: run :func:`hhfft.convert.distill` to fit them).
    ``state_dict()`` gains only ``<owner>.hedgehog.{q_map,k_map}.{weight,bias}`` keys. Sites whose mask is neither
    causal nor key padding, or whose query and key lengths differ, stay softmax and are reported.

    Args:
        model: any nn.Module (HF transformers models, nn.MultiheadAttention, hand-written attention)
        example_inputs: a tuple of positional inputs, a dict of keyword inputs, or one tensor; the model is traced
            once on them (under no_grad)
        config: :class:`HedgehogConfig` (feature map kind and dim, which sites)
    Returns:
        a :class:`hhfft.Report` with one ``kind="hedgehog"`` row per attention site: rewritten (converted),
        kept (not selected) or skipped (why)

    Example:
        >>> mha = torch.nn.MultiheadAttention(16, 4, batch_first=True)
        >>> x = torch.randn(2, 5, 16)
        >>> report = convert(mha, (x, x, x, None, False))
        >>> sorted(k for k in mha.state_dict() if "hedgehog" in k)
        ['hedgehog.k_map.bias', 'hedgehog.k_map.weight', 'hedgehog.q_map.bias', 'hedgehog.q_map.weight']
    """
    from hhfft.passes.linearize import LINEARIZABLE

    config = HedgehogConfig() if config is None else config
    if not isinstance(config, HedgehogConfig):
        raise TypeError(f"convert: config must be a hhfft.convert.HedgehogConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be an nn.Module, got {type(model).__name__}")
    if hedgehog_sites(model):  # a second convert mixed two configs, reset distilled maps, and undid both on failure
        raise ValueError(
            f"convert: the model is already converted ({len(hedgehog_sites(model))} sites); to convert it again with "
            "another config, call hhfft.convert.uninstall(model) first (its feature maps are dropped)")
    report = capture(model, example_inputs)
    found = attention_sites(report)
    skipped = [s for s in report.select("attention", "skipped")]
    paths = [rec.owner for _, rec in found]
    chosen = set(select_sites(paths, config))
    out = Report()
    for s in skipped:
        out.add(Site(kind="hedgehog", spelling=s.spelling, module_path=s.module_path, shapes=s.shapes, dtype=s.dtype,
                     decision="skipped", reason=f"not proved to be softmax attention: {s.reason}", record=s.record))
    installed = []
    for (s, rec), idx, i in zip(found, _owner_index(found), range(len(found))):
        row = Site(kind="hedgehog", spelling=s.spelling, module_path=rec.owner, shapes=s.shapes, dtype=s.dtype,
                   decision="rewritten", record=rec)
        out.add(row)
        if i not in chosen:
            row.decision, row.reason = "kept", "not selected by the config (sites/layers/exclude)"
            continue
        if rec.mask_kind not in LINEARIZABLE:
            row.decision, row.reason = "skipped", f"mask is {rec.mask_kind}: neither causal nor key padding"
            continue
        if as_int(rec.q_len) is None or as_int(rec.q_len) != as_int(rec.kv_len):
            row.decision, row.reason = "skipped", "query and key lengths differ (cross-attention or a KV cache)"
            continue
        heads, kv_heads, head_dim = as_int(rec.heads), as_int(rec.kv_heads), as_int(rec.head_dim)
        owner, path = _resolve(model, rec)
        if owner is None:
            row.decision, row.reason = "skipped", f"owner module {rec.owner!r} not found under the model"
            continue
        row.module_path = path
        hh = HedgehogAttention(heads, kv_heads, head_dim, config.kind, config.feature_dim, config.bias,
                               config.window, config.sinks, **_param_like(owner))
        install(owner, idx, hh)
        installed.append(row)
        row.reason = (f"{site_name(idx)}: {config.kind} maps, heads {heads}/{kv_heads}, dim {head_dim}, "
                      f"features {config.feature_dim or head_dim}"
                      + (f", softmax window {config.window}" if config.window else "")
                      + (f", {config.sinks} softmax sink(s)" if config.sinks else ""))
    model._hhfft_config = config
    if installed:
        install_root(model)
        try:
            _verify(model, example_inputs, installed)
        except Exception as e:
            uninstall(model)
            first = (str(e).strip().splitlines() or [""])[0]
            raise RuntimeError(
                "hhfft.convert: the converted model failed on the example inputs, so the conversion was undone (no "
                "Hedgehog site is left on the model). A converted model runs its whole forward as one graph "
                "(torch.compile fullgraph, hhfft's passes, no Inductor): a graph break anywhere in it "
                "(data-dependent Python control flow such as `if x.max().item() > c`, a print, an unsupported call) "
                "makes it fail. Remove the graph break, or convert the submodule that holds the attention. The "
                f"failure (in full above): {type(e).__name__}: {first}"
            ) from e
    return out


@contextlib.contextmanager
def collect_reports():
    sink: list = []
    tok = _REPORTS.set(sink)
    try:
        yield sink
    finally:
        _REPORTS.reset(tok)


def _verify(model: nn.Module, example_inputs: Any, rows: list) -> None:
    """Run the converted model eagerly once: every installed site must come out linearized."""
    torch._dynamo.reset()
    with collect_reports() as sink, torch.no_grad():
        call_model(model, example_inputs)
    done: dict = {}
    for r in sink:
        for s in r.select("hedgehog"):
            done.setdefault(s.module_path, []).append(s)
    for row in rows:
        got = [x for path, xs in done.items() for x in xs
               if path == row.module_path or path.endswith("." + row.module_path)]
        if not any(s.decision == "rewritten" for s in got):
            row.decision = "skipped"
            row.reason = "installed but not linearized on the example inputs" + (f": {got[0].reason}" if got else "")


def sites_summary(model: nn.Module) -> list:
    return [(p, i, n, hh.describe()) for p, i, n, hh in hedgehog_sites(model)]
