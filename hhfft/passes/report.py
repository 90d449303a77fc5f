"""Site records and the report that ``hhfft.explain`` returns: every site found, and what was done with it."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Optional

import torch

__all__ = ["Site", "Report", "Decision", "module_path", "describe_shape"]

Decision = Literal["rewritten", "kept", "skipped"]


@dataclass
class Site:
    """One site a pass looked at.

    kind: "longconv" or "attention"; spelling: how the model wrote it ("conv1d", "fft", "sdpa", "matmul", ...);
    module_path: owner module from nn_module_stack ("blocks.0.mixer"); decision and a human-readable reason;
    record: the pass's own structured record (LongConvSite, AttentionSite) for tests and later passes.
    """

    kind: str
    spelling: str
    module_path: str
    shapes: str
    dtype: str
    decision: Decision
    reason: str = ""
    record: Any = None
    graph_id: int = 0


class Report:
    """The sites of one or more graphs. ``str(report)`` is a table; ``report.count(kind, decision)`` counts."""

    def __init__(self, sites: Optional[list[Site]] = None) -> None:
        self.sites: list[Site] = list(sites or [])

    def add(self, site: Site) -> Site:
        self.sites.append(site)
        return site

    def extend(self, other: "Report") -> None:
        self.sites.extend(other.sites)

    def __iter__(self) -> Iterator[Site]:
        return iter(self.sites)

    def __len__(self) -> int:
        return len(self.sites)

    def __getitem__(self, i: int) -> Site:
        return self.sites[i]

    def select(self, kind: Optional[str] = None, decision: Optional[Decision] = None) -> list[Site]:
        return [s for s in self.sites if (kind is None or s.kind == kind) and (decision is None or s.decision == decision)]

    def count(self, kind: Optional[str] = None, decision: Optional[Decision] = None) -> int:
        return len(self.select(kind, decision))

    def __str__(self) -> str:
        if not self.sites:
            return "hhfft: no long-convolution or attention sites found"
        head = ("graph", "kind", "spelling", "module", "shapes", "dtype", "decision", "reason")
        rows = [
            (str(s.graph_id), s.kind, s.spelling, s.module_path or "-", s.shapes, s.dtype, s.decision, s.reason)
            for s in self.sites
        ]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head) - 1)]
        fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1]  # noqa: E731
        lines = [fmt(head), "  ".join("-" * w for w in widths) + "  " + "-" * 6, *map(fmt, rows)]
        summary = ", ".join(f"{d}: {self.count(decision=d)}" for d in ("rewritten", "kept", "skipped"))
        return "\n".join(lines + [f"{len(self.sites)} sites ({summary})"])

    __repr__ = __str__


def module_path(node: torch.fx.Node) -> str:
    """Dotted path of the innermost nn.Module that created ``node`` ("" at top level)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    # Dynamo writes paths like "L['self'].blocks[0].conv" or "L['self'].blocks._modules['0']"; normalise to dotted.
    # The root is the frame's local holding the model: L['self'], or L['args'][0] when a bound method is compiled.
    path = re.sub(r"^L\[[^\]]*\](\[[^\]]*\])*", "", path)
    path = path.replace("._modules['", ".").replace("['", ".").replace("']", "").replace("[", ".").replace("]", "")
    return path.strip(".")


def describe_shape(*vals: Any) -> str:
    def one(v: Any) -> str:
        if isinstance(v, torch.Tensor):
            return "x".join(str(s) for s in v.shape)
        return str(v)

    return ", ".join(one(v) for v in vals)
