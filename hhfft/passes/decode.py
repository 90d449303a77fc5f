"""Attention that reads a :class:`hhfft.convert.decode.HedgehogCache` layer -> constant-state Hedgehog decoding.

Called by the linearize pass for each site it pairs with feature maps. A site reads the cache when the k and v that
SDPA receives are the outputs of the marker ``hhfft::hedgehog_cache_kv(k_new, v_new, S, z, past)`` (directly or
through GQA repeats/views that keep their values: expand, reshape, view, contiguous, clone). Such a site is replaced by

    hedgehog_decode(q, k_new, v_new, wq, bq, wk, bk, kind, S, z, keep)

(``hhfft.lowering.decode``): the new tokens attend causally to each other and to the state, which is updated in
place. The marker's outputs stand for keys over past + new tokens, so the mask that SDPA receives covers them
too; ``keep`` (the new keys' padding mask) is its last query row restricted to the new keys.

What is proved before rewriting: one new token (statically), or a mask the attention pass proved causal /
causal + key padding (a prompt); otherwise (a non-causal site, an unproved mask over several new tokens) the pass
raises: decoding would compute something else than the model run over the whole sequence.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

from hhfft.passes._fx import as_int, bump, insert_call, known_eq, replace_node, val

__all__ = ["cache_marker", "is_cache_marker", "rewrite"]

_VIEWS = {"expand", "reshape", "view", "contiguous", "clone"}


def is_cache_marker(n: Any) -> bool:
    if not isinstance(n, fx.Node) or n.op != "call_function":
        return False
    t = n.target
    name = getattr(getattr(t, "_schema", None), "name", None) or getattr(t, "_qualified_op_name", None)
    return name == "hhfft::hedgehog_cache_kv"


def _through_views(n: Any) -> Any:
    """Follow a node back through value-preserving single-input ops (GQA repeat: [:, :, None] -> expand -> reshape)."""
    while isinstance(n, fx.Node):
        method = n.op == "call_method" and n.target in _VIEWS
        if method or (n.op == "call_function" and n.target in (torch.reshape, torch.Tensor.contiguous,
                                                                 torch.Tensor.expand)):
            n = n.args[0]
        elif n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[0], fx.Node) \
                and not is_cache_marker(n.args[0]) and _is_none_index(n.args[1]):
            n = n.args[0]  # x[:, :, None, :, :] in repeat_kv
        else:
            return n
    return n


def _is_none_index(idx: Any) -> bool:
    """x[:, :, None] (optionally followed by full slices): the new axis right after the heads, as repeat_kv writes it,
    so that query head h reads key/value head h // G (the order hedgehog_decode uses)."""
    if not isinstance(idx, tuple) or len(idx) < 3:
        return False
    full = slice(None)
    return idx[0] == full and idx[1] == full and idx[2] is None and all(
        i == full or i is Ellipsis for i in idx[3:])


def cache_marker(k: Any, v: Any) -> fx.Node | None:
    """The ``hedgehog_cache_kv`` node whose outputs 0 and 1 are (up to views) ``k`` and ``v``, or None."""
    src = []
    for x, i in ((k, 0), (v, 1)):
        x = _through_views(x)
        if not (isinstance(x, fx.Node) and x.op == "call_function" and x.target is operator.getitem
                and is_cache_marker(x.args[0]) and x.args[1] == i):
            return None
        src.append(x.args[0])
    return src[0] if src[0] is src[1] else None


def keep_from_mask(mask: torch.Tensor, q: torch.Tensor, k_new: torch.Tensor) -> torch.Tensor:
    """[B, L] keep mask of the new keys: the last query row of an SDPA mask over past + L keys, its last L columns
    (bool: True = attend; additive: 0 = attend)."""
    allowed = mask if mask.dtype == torch.bool else mask == 0
    while allowed.dim() < 4:
        allowed = allowed.unsqueeze(0)
    L = k_new.shape[-2]
    row = allowed[:, 0, -1, allowed.shape[-1] - L:]
    return row.expand(q.shape[0], L).contiguous()


def _decode(q, k, v, wq, bq, wk, bk, kind: str, state, normalizer, keep):
    from hhfft.lowering.decode import hedgehog_decode

    return hedgehog_decode(q, k, v, wq, bq, wk, bk, kind, state, normalizer, keep)


def rewrite(g: fx.Graph, site: Any, parts: dict, maps: tuple, path: str, report_fn: Any) -> bool:
    """Rewrite the SDPA of ``site`` if it reads a HedgehogCache layer; False when it does not (nothing changed).

    ``parts``: the SDPA's q, k, v, mask, is_causal; ``maps``: (wq, bq, wk, bk, kind, window, sinks);
    ``report_fn(decision, reason)`` records the outcome."""
    marker = cache_marker(parts["k"], parts["v"])
    if marker is None:
        return False
    if maps[5]:
        raise ValueError(
            f"hhfft decode: the attention at {path or '<root>'!r} is a sliding-window hybrid (window {maps[5]}), which "
            "needs the last window's keys and values as well as the Hedgehog state; HedgehogCache keeps only the "
            "constant-size state. Run the full forward without a cache for this model (generate(use_cache=False)), "
            "or convert it with window=0")
    if maps[6]:
        raise ValueError(
            f"hhfft decode: the attention at {path or '<root>'!r} has {maps[6]} softmax sink(s), whose keys and values "
            "HedgehogCache does not keep besides the constant-size state. Run the full forward without a cache for "
            "this model (generate(use_cache=False)), or convert it with sinks=0")
    n = site.sdpa
    k_new, v_new, state, normalizer = marker.args[:4]
    tq, tk = val(parts["q"]), val(k_new)
    q_len = tq.shape[-2]
    if not known_eq(q_len, tk.shape[-2]):
        raise ValueError(f"hhfft decode: at {path or '<root>'!r} the queries ({q_len}) and the new keys "
                         f"({tk.shape[-2]}) differ in length; a HedgehogCache layer must receive the same tokens as "
                         "its attention's queries")
    one = known_eq(q_len, 1)
    kind_ok = site.mask_kind in ("causal", "causal+key_padding") or (site.mask_kind == "none" and bool(site.causal))
    if not one and not kind_ok:
        raise ValueError(
            f"hhfft decode: the attention at {path or '<root>'!r} reads a HedgehogCache with "
            f"{q_len if as_int(q_len) is not None else 'several'} new tokens, but its "
            f"mask is {site.mask_kind!r}{' (not causal)' if site.mask_kind in ('none', 'key_padding') else ''}; "
            "constant-state decoding needs causal attention (a decoder LM). Feed a prompt through a fresh cache, then "
            "one token per step; for non-causal models run the full forward without a cache")
    mask = parts["mask"]
    wq, bq, wk, bk, kind = maps[:5]
    heads_k, heads_map = tk.shape[1], val(wk).shape[0]
    km = None
    with g.inserting_before(n):
        if not known_eq(heads_k, heads_map):
            # the site's SDPA received repeated K/V (GQA spelled with repeat_kv), so the k map has one head per
            # repeat: repeat the new token's k, v likewise (the state has the map's heads)
            rep = heads_map // heads_k
            k_new = insert_call(g, torch.repeat_interleave, (k_new, rep), {"dim": 1}, like=n)
            v_new = insert_call(g, torch.repeat_interleave, (v_new, rep), {"dim": 1}, like=n)
        if isinstance(mask, fx.Node) and ("key_padding" in site.mask_kind or one):
            km = insert_call(g, keep_from_mask, (mask, parts["q"], k_new), like=n)
        out = insert_call(g, _decode, (parts["q"], k_new, v_new, wq, bq, wk, bk, kind, state, normalizer, km), like=n)
    site.sdpa = replace_node(g, n, out)
    _erase_dead(g, marker)
    report_fn("rewritten", "hedgehog decoding with a constant-size state" + (" (one token)" if one else " (prompt)"))
    bump("hedgehog_decode")
    return True


def _erase_dead(g: fx.Graph, marker: fx.Node) -> None:
    """Remove the marker and whatever hangs off it once nothing reads it (the eager spelling's k^T, say). If the
    model still uses the cache's keys for something else, the marker stays and running it raises a clear error."""
    below, todo = set(), [marker]
    while todo:
        for u in todo.pop().users:
            if u not in below:
                below.add(u)
                todo.append(u)
    for node in reversed(list(g.nodes)):
        if node in below and not node.users and not node.is_impure():
            g.erase_node(node)
    if not marker.users:
        g.erase_node(marker)
