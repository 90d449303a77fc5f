"""Small FX helpers every pass uses: example values, inserting a node with consistent meta, bumping counters."""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.fx as fx
from torch._dynamo.utils import counters
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.utils._pytree import tree_map

__all__ = ["val", "insert_call", "replace_node", "bump", "known_eq", "known_true", "as_int", "arg"]


def val(n: Any) -> Any:
    """The example value of a node (Dynamo graphs: meta["example_value"]; traced graphs: meta["val"]) or the constant."""
    if isinstance(n, fx.Node):
        return n.meta.get("example_value", n.meta.get("val"))
    return n


def arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    """Argument ``i`` (positional) or ``name`` (keyword) of a call node."""
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _fake_mode(graph: fx.Graph):
    for n in graph.nodes:
        v = val(n)
        if isinstance(v, torch.Tensor) and hasattr(v, "fake_mode"):
            return v.fake_mode
    return None


def insert_call(graph: fx.Graph, target: Callable, args: tuple, kwargs: Optional[dict] = None, like: Optional[fx.Node] = None) -> fx.Node:
    """Insert ``target(*args, **kwargs)`` at the current insertion point and fill its example value.

    The example value is computed by running ``target`` on the example values of its inputs under the graph's fake
    mode, so node.meta stays consistent (also with symbolic shapes). ``like`` copies stack_trace/nn_module_stack.
    """
    kwargs = kwargs or {}
    node = graph.call_function(target, args, kwargs)
    if like is not None:
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if key in like.meta:
                node.meta[key] = like.meta[key]
    mode = _fake_mode(graph)
    if mode is not None:
        a, k = tree_map(val, (args, kwargs))
        with mode:
            out = target(*a, **k)
        key = "example_value" if any("example_value" in n.meta for n in graph.nodes) else "val"
        node.meta[key] = out
    return node


def replace_node(graph: fx.Graph, old: fx.Node, new: fx.Node) -> fx.Node:
    """Hand ``old``'s users to ``new`` (cast to ``old``'s dtype where the two differ) and erase ``old``; returns the
    node that now stands for it."""
    if val(new) is not None and val(old) is not None and val(new).dtype != val(old).dtype:
        with graph.inserting_after(new):
            new = insert_call(graph, torch.Tensor.to, (new, val(old).dtype), like=old)
    old.replace_all_uses_with(new)
    graph.erase_node(old)
    return new


def bump(name: str, by: int = 1) -> None:
    """Count a rewrite in torch._dynamo.utils.counters["hhfft"][name] (tests assert these)."""
    counters["hhfft"][name] += by


def known_true(cond: Any) -> bool:
    """True when a condition over ints/SymInts is provable; never guesses (and adds no guards)."""
    if isinstance(cond, bool):
        return cond
    try:
        return bool(statically_known_true(cond))
    except Exception:  # noqa: BLE001 - an unprovable comparison is simply "not known"
        return False


def known_eq(a: Any, b: Any) -> bool:
    """True when a == b is provable (ints, SymInts, or tuples of them)."""
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(known_eq(x, y) for x, y in zip(a, b))
    return known_true(a == b)


def as_int(x: Any) -> Optional[int]:
    """A python int if x is an int or a SymInt with a constant value, else None."""
    if isinstance(x, int):
        return x
    if isinstance(x, torch.SymInt):
        expr = x.node.expr
        if expr.is_number:
            return int(expr)
    return None
