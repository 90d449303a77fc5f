"""What ``hhfft.convert`` installs in a model: the config, the per-site ``HedgehogAttention`` module, the site marker
op, and the forward that makes the owner module compute Hedgehog attention eagerly.

How a converted site works:

- the module that owns an attention site (the innermost module whose forward calls it) gets a submodule
  ``hedgehog`` (``hedgehog_1``, ... for further sites of the same owner): a :class:`HedgehogAttention` holding the
  two feature maps ``q_map`` and ``k_map``; ``state_dict()`` gains only ``<owner>.hedgehog.{q,k}_map.*`` keys;
- the owner's class is swapped for a subclass whose ``forward`` first calls the marker op
  ``hhfft::hedgehog_site(wq, bq, wk, bk, kind, index)`` and then the original forward. Under Dynamo the marker is a
  node of the graph whose inputs are the maps' parameters; the ``linearize`` pass pairs it with the attention site
  of the same owner and replaces the SDPA call by Hedgehog linear attention on those parameters (so AOTAutograd
  differentiates the real parameters). The marker itself computes nothing;
- eagerly (outside any compile), the owner's forward runs through Dynamo with hhfft's passes and no Inductor
  (``compiler="eager"``): the same rewrite, run as plain torch. Inside an outer ``torch.compile`` the owner's
  forward is traced as it is and the outer ``hhfft`` backend does the rewrite.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from hhfft.nn.hedgehog import FeatureMapKind, FeatureMapKindName, HedgehogFeatureMap, feature_map

__all__ = ["HedgehogConfig", "HedgehogAttention", "hedgehog_sites", "hedgehog_mode", "is_converted", "install", "uninstall",
           "site_name", "select_sites"]

SITE_OP = "hhfft::hedgehog_site"


@dataclass(frozen=True)
class HedgehogConfig:
    """How to convert attention sites to Hedgehog attention.

    kind: the feature map kind (``hhfft.nn.HedgehogFeatureMap``): "softmax_split" (default), "exp",
        "joint_softmax", "elu1", "t2r".
    feature_dim: F, the projected feature size per head (None = head_dim); phi has 2F features for the first three
        kinds.
    bias: learn a bias in the maps.
    sites: fnmatch globs over owner module paths ("encoder.layer.*.attention.self"); None = every site.
    layers: indices of sites in the order the forward meets them (negative counts from the end); None = every
        site. LoLCATs-style hybrids keep some layers softmax: ``layers=range(1, 6)``.
    exclude: globs of owner module paths that stay softmax.
    window: 0 (default) = Hedgehog linear attention; w >= 1 = the LoLCATs hybrid: softmax over the keys within w
        positions of each query (|i - j| < w), Hedgehog linear terms for the others, balanced by a learned per-head
        weight (``hhfft/lowering/window_attention.py``). Exact softmax where the sequence is no longer than w.
    sinks: 0 (default) = none; n >= 1 = softmax terms for the first n keys of the sequence (the attention sinks:
        [CLS], <bos>), Hedgehog linear terms for the others, on one scale through a learned per-query log-normaliser
        (``hhfft/lowering/sink_attention.py``). Not combined with a window.
    """

    kind: FeatureMapKindName = "softmax_split"
    feature_dim: Optional[int] = None
    bias: bool = True
    sites: Optional[tuple] = None
    layers: Optional[tuple] = None
    exclude: tuple = field(default_factory=tuple)
    window: int = 0
    sinks: int = 0

    def __post_init__(self) -> None:
        FeatureMapKind.parse(self.kind)
        _check_hybrid("HedgehogConfig", self.window, self.sinks)
        if self.feature_dim is not None and (isinstance(self.feature_dim, bool) or not isinstance(self.feature_dim, int)
                                             or self.feature_dim < 1):
            raise ValueError(f"HedgehogConfig: feature_dim must be a positive int or None, got {self.feature_dim!r}")
        for name in ("sites", "layers", "exclude"):
            v = getattr(self, name)
            if isinstance(v, (str, int)):
                v = (v,)
            if v is not None:
                object.__setattr__(self, name, tuple(v))
        if self.layers is not None and not all(isinstance(i, int) and not isinstance(i, bool) for i in self.layers):
            raise TypeError(f"HedgehogConfig: layers must be ints (site indices), got {self.layers!r}")

    def to_dict(self) -> dict:
        return {"kind": FeatureMapKind.parse(self.kind).value, "feature_dim": self.feature_dim, "bias": self.bias,
                "sites": None if self.sites is None else list(self.sites),
                "layers": None if self.layers is None else list(self.layers), "exclude": list(self.exclude),
                "window": self.window, "sinks": self.sinks}

    @classmethod
    def from_dict(cls, d: dict) -> "HedgehogConfig":
        return cls(kind=d.get("kind", "softmax_split"), feature_dim=d.get("feature_dim"), bias=d.get("bias", True),
                   sites=d.get("sites"), layers=d.get("layers"), exclude=tuple(d.get("exclude") or ()),
                   window=d.get("window", 0), sinks=d.get("sinks", 0))


def _check_hybrid(who: str, window: Any, sinks: Any) -> None:
    for name, x in (("window", window), ("sinks", sinks)):
        if isinstance(x, bool) or not isinstance(x, int) or x < 0:
            raise ValueError(f"{who}: {name} must be an int >= 0 (0 = none), got {x!r}")
    if window and sinks:
        raise ValueError(f"{who}: a softmax window ({window}) and attention sinks ({sinks}) together are not "
                         "supported; choose one (window=0 or sinks=0)")


class HedgehogAttention(nn.Module):
    """The feature maps of one attention site, and Hedgehog attention with them.

    Args:
        num_heads: Hq; num_kv_heads: Hkv (Hq a multiple of Hkv); head_dim: D of q and k
        kind, feature_dim, bias, window, sinks: as in :class:`HedgehogConfig`

    Parameters: ``q_map.weight`` [Hq, D, F], ``q_map.bias`` [Hq, F], ``k_map.weight`` [Hkv, D, F],
    ``k_map.bias`` [Hkv, F]; with a window, ``mix`` [Hq] (the logit of the softmax terms' share, 0 at the start);
    with sinks, ``lse`` [Hq, D + 1] (the log-normaliser's weights and bias, 0 at the start).

    Example:
        >>> hh = HedgehogAttention(4, 2, 8)
        >>> hh(torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), causal=True).shape
        torch.Size([1, 4, 5, 8])
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, kind: str = "softmax_split",
                 feature_dim: Optional[int] = None, bias: bool = True, window: int = 0, sinks: int = 0, *,
                 device=None, dtype=None) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"HedgehogAttention: num_heads ({num_heads}) must be a multiple of num_kv_heads "
                             f"({num_kv_heads})")
        self.kind = FeatureMapKind.parse(kind).value
        self.q_map = HedgehogFeatureMap(num_heads, head_dim, feature_dim, kind, bias, device=device, dtype=dtype)
        self.k_map = HedgehogFeatureMap(num_kv_heads, head_dim, feature_dim, kind, bias, device=device, dtype=dtype)
        _check_hybrid("HedgehogAttention", window, sinks)
        self.window, self.sinks = window, sinks
        self.mix = nn.Parameter(torch.zeros(num_heads, device=device, dtype=dtype)) if window else None
        self.lse = nn.Parameter(torch.zeros(num_heads, head_dim + 1, device=device, dtype=dtype)) if sinks else None

    def describe(self) -> dict:
        return {"heads": self.q_map.num_heads, "kv_heads": self.k_map.num_heads, "head_dim": self.q_map.head_dim,
                "feature_dim": self.q_map.feature_dim, "kind": self.kind, "bias": self.q_map.bias is not None,
                "window": self.window, "sinks": self.sinks}

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool, key_mask: Optional[Tensor] = None,
                scale: Optional[float] = None) -> Tensor:
        """q [B, Hq, L, D], k [B, Hkv, L, D], v [B, Hkv, L, Dv], key_mask [B, L] bool -> [B, Hq, L, Dv]; ``scale``
        (of the window's or sinks' softmax terms) as SDPA's."""
        return hedgehog_attention(q, k, v, self.q_map.weight, self.q_map.bias, self.k_map.weight, self.k_map.bias,
                                  self.kind, causal, key_mask, self.window, self.mix, scale, self.sinks, self.lse)

    def weights(self, q: Tensor, k: Tensor, allowed: Optional[Tensor] = None, scale: Optional[float] = None) -> Tensor:
        """The normalised attention weights [B, Hq, L, S] (fp32), zero where ``allowed`` ([B or 1, H or 1, L, S]
        bool) is False: phi(q_i).phi(k_j) / sum_j, or the window or sink hybrid's. For distillation and pictures;
        quadratic in L."""
        return hedgehog_weights(q, k, self.q_map.weight, self.q_map.bias, self.k_map.weight, self.k_map.bias,
                                self.kind, allowed, self.window, self.mix, scale, self.sinks, self.lse)


def hedgehog_attention(q: Tensor, k: Tensor, v: Tensor, wq: Tensor, bq: Optional[Tensor], wk: Tensor,
                       bk: Optional[Tensor], kind: str, causal: bool, key_mask: Optional[Tensor], window: int = 0,
                       mix: Optional[Tensor] = None, scale: Optional[float] = None, sinks: int = 0,
                       lse: Optional[Tensor] = None) -> Tensor:
    """A converted site's attention (see :meth:`HedgehogAttention.forward`), the parameters given explicitly (graph
    nodes in the linearize pass): Hedgehog linear attention, or the window hybrid when ``window`` > 0, or the sink
    hybrid when ``sinks`` > 0."""
    if sinks:
        from hhfft.lowering.sink_attention import hedgehog_sink_attention

        return hedgehog_sink_attention(q, k, v, wq, bq, wk, bk, lse, kind=kind, sinks=sinks, causal=causal,
                                       key_mask=key_mask, scale=scale)
    if window:
        from hhfft.lowering.window_attention import hedgehog_window_attention

        return hedgehog_window_attention(q, k, v, wq, bq, wk, bk, mix, kind=kind, window=window, causal=causal,
                                         key_mask=key_mask, scale=scale)
    from hhfft.lowering.linear_attention import hedgehog_linear_attention

    return hedgehog_linear_attention(q, k, v, wq, bq, wk, bk, kind=kind, causal=causal, key_mask=key_mask)


def hedgehog_weights(q: Tensor, k: Tensor, wq: Tensor, bq: Optional[Tensor], wk: Tensor, bk: Optional[Tensor],
                     kind: str, allowed: Optional[Tensor], window: int = 0, mix: Optional[Tensor] = None,
                     scale: Optional[float] = None, sinks: int = 0, lse: Optional[Tensor] = None) -> Tensor:
    """See :meth:`HedgehogAttention.weights`; the parameters given explicitly (graph nodes in the distill tap)."""
    from hhfft.kernels.linear_attention.naive import DEN_FLOOR, sink_weights_naive, window_weights_naive
    from hhfft.lowering.linear_attention import _project

    pq = feature_map(_project(q.float(), wq.float(), None if bq is None else bq.float()), kind)
    pk = feature_map(_project(k.float(), wk.float(), None if bk is None else bk.float()), kind)
    g = pq.shape[1] // pk.shape[1]
    if g > 1:
        pk = pk.repeat_interleave(g, dim=1)
    s = pq @ pk.transpose(-1, -2)
    if window or sinks:
        kr = k.float().repeat_interleave(g, dim=1) if g > 1 else k.float()
        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        ok = torch.ones((), dtype=torch.bool, device=s.device) if allowed is None else allowed
        scores = (q.float() @ kr.transpose(-1, -2)) * scale
        if sinks:
            d = q.shape[-1]
            lam = torch.einsum("bhld,hd->bhl", q.float(), lse[:, :d].float()) + lse[:, d].float()[None, :, None]
            return sink_weights_naive(scores, s, ok, lam, sinks)
        return window_weights_naive(scores, s, ok, torch.sigmoid(mix.float()), window)
    if allowed is not None:
        s = s * allowed
    return s / s.sum(-1, keepdim=True).clamp_min(DEN_FLOOR)  # what hhfft::linear_attention divides by


# ------------------------------------------------------------------------------------------------------ the marker
@torch.library.custom_op(SITE_OP, mutates_args=())
def _site_marker(wq: Tensor, bq: Optional[Tensor], wk: Tensor, bk: Optional[Tensor], kind: str, index: int,
                 window: int = 0, mix: Optional[Tensor] = None, sinks: int = 0, lse: Optional[Tensor] = None) -> None:
    """Marks, in a traced forward, that the owner module's attention site number ``index`` has these feature maps
    (and this softmax window and mixing logit, or these sinks and log-normaliser)."""
    return None


@_site_marker.register_fake
def _(wq, bq, wk, bk, kind, index, window=0, mix=None, sinks=0, lse=None):
    return None


# Dynamo and FX would drop a node with no users; the marker must reach the linearize pass.
torch.fx.node.has_side_effect(torch.ops.hhfft.hedgehog_site.default)
torch.fx.node.has_side_effect(torch.ops.hhfft.hedgehog_site)


def site_name(index: int) -> str:
    """The submodule name of the owner's site ``index``: "hedgehog", "hedgehog_1", ..."""
    return "hedgehog" if index == 0 else f"hedgehog_{index}"


def _mark(owner: nn.Module) -> None:
    for i in getattr(owner, "_hhfft_sites", ()):
        hh = getattr(owner, site_name(i))
        torch.ops.hhfft.hedgehog_site(hh.q_map.weight, hh.q_map.bias, hh.k_map.weight, hh.k_map.bias, hh.kind, i,
                                      hh.window, hh.mix, hh.sinks, hh.lse)


# ---------------------------------------------------------------------------------------- the owner's eager forward
_MODE: contextvars.ContextVar[str] = contextvars.ContextVar("hhfft_hedgehog_mode", default="linear")
_RECOMPILE_LIMIT = 64  # one graph per owner class and input signature; generous, scoped to these calls


_REPORTS: contextvars.ContextVar = contextvars.ContextVar("hhfft_hedgehog_reports", default=None)


def _backend_linear(gm, example_inputs):
    from hhfft.lowering.backend import Options, _check_buffers, run_passes

    report = run_passes(gm, Options(longconv=False, linearize=True, compiler="eager"))
    sink = _REPORTS.get()
    if sink is not None:
        sink.append(report)
    for site in report.select("hedgehog", "skipped"):  # softmax on these inputs: say so, once per site and reason
        warnings.warn(f"hhfft: converted attention {site.module_path or '<root>'} computes softmax attention on "
                      f"these inputs: {site.reason}", stacklevel=2)
    return _check_buffers(gm, gm.forward)  # mask buffers proved from their value are checked on every call


def _backend_tap(gm, example_inputs):
    from hhfft.lowering.backend import Options, _check_buffers, run_passes
    from hhfft.passes import linearize

    opts = Options(longconv=False, linearize=False, compiler="eager")
    report = run_passes(gm, opts)
    linearize.run(gm, opts, report, mode="tap")
    gm.graph.lint()
    gm.recompile()
    return _check_buffers(gm, gm.forward)


def _body_linear(owner, base_forward, args, kwargs):
    _mark(owner)
    return base_forward(owner, *args, **kwargs)


def _body_tap(owner, base_forward, args, kwargs):
    _mark(owner)
    return base_forward(owner, *args, **kwargs)


_COMPILED: dict = {}


def _compiled(mode: str):
    fn = _COMPILED.get(mode)
    if fn is None:
        body, backend = (_body_linear, _backend_linear) if mode == "linear" else (_body_tap, _backend_tap)
        # fullgraph: a graph break (or a failing pass) must raise, never fall back to running softmax silently
        fn = _COMPILED[mode] = torch.compile(body, backend=backend, fullgraph=True)
    return fn


@contextlib.contextmanager
def hedgehog_mode(mode: str):
    """"linear" (default): converted sites compute Hedgehog attention. "tap": they compute softmax attention (the
    teacher) and each reports its distillation loss (``hhfft.convert.distill``)."""
    tok = _MODE.set(mode)
    try:
        yield
    finally:
        _MODE.reset(tok)


def _converted_forward(self, *args, **kwargs):
    base = type(self)._hhfft_base.forward
    if torch.compiler.is_compiling():
        _mark(self)
        return base(self, *args, **kwargs)
    with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT,
                                    accumulated_recompile_limit=max(256, 4 * _RECOMPILE_LIMIT)):
        return _compiled(_MODE.get())(self, base, args, kwargs)


_CLASSES: dict = {}


def _converted_class(cls: type) -> type:
    if getattr(cls, "_hhfft_base", None) is not None:
        return cls
    new = _CLASSES.get(cls)
    if new is None:
        def forward(self, *args, **kwargs):
            return _converted_forward(self, *args, **kwargs)

        # the base forward's name, doc and signature (through __wrapped__): HF generate reads the signature to decide
        # what to pass (position_ids for left-padded batches, attention_mask, logits_to_keep)
        functools.update_wrapper(forward, cls.forward)
        new = type(f"Hedgehog{cls.__name__}", (cls,), {"forward": forward, "_hhfft_base": cls,
                                                        "__module__": __name__})
        _CLASSES[cls] = new
    return new


def __getattr__(name: str) -> Any:  # pickling support for the generated classes
    for new in _CLASSES.values():
        if new.__name__ == name:
            return new
    raise AttributeError(name)


# --------------------------------------------------------------------------------------------- install / inspect
def install(owner: nn.Module, index: int, hh: HedgehogAttention) -> str:
    """Install ``hh`` as the feature maps of the owner's site ``index``; returns the submodule name."""
    name = site_name(index)
    owner.add_module(name, hh)
    owner._hhfft_sites = tuple(sorted(set(getattr(owner, "_hhfft_sites", ())) | {index}))
    owner.__class__ = _converted_class(type(owner))
    return name


def install_root(model: nn.Module) -> None:
    """Make the model's own eager forward run through Dynamo with hhfft's passes (no Inductor), so the masks it
    builds are proved on the whole forward (an owner called on its own proves only what its own forward shows)."""
    if not hasattr(model, "_hhfft_sites"):
        model._hhfft_sites = ()
    model.__class__ = _converted_class(type(model))


def uninstall(model: nn.Module) -> None:
    """Remove every Hedgehog site from ``model`` (the original modules and forward come back)."""
    for _, m in model.named_modules():
        base = getattr(type(m), "_hhfft_base", None)
        if base is None:
            continue
        for i in getattr(m, "_hhfft_sites", ()):
            delattr(m, site_name(i))
        if hasattr(m, "_hhfft_sites"):
            del m._hhfft_sites
        m.__class__ = base


def is_converted(module: nn.Module) -> bool:
    return getattr(type(module), "_hhfft_base", None) is not None


def hedgehog_sites(model: nn.Module) -> list:
    """[(owner path, index, submodule name, HedgehogAttention)] of a converted model, in module order."""
    out = []
    for path, m in model.named_modules():
        if is_converted(m):
            for i in getattr(m, "_hhfft_sites", ()):
                out.append((path, i, site_name(i), getattr(m, site_name(i))))
    return out


def select_sites(paths: Sequence[str], config: HedgehogConfig) -> list:
    """Indices (into ``paths``, the sites in forward order) that ``config`` selects."""
    import fnmatch

    n = len(paths)
    listing = "; the sites are " + ", ".join(f"{i}: {p or '<root>'}" for i, p in enumerate(paths))
    bad = [i for i in config.layers or () if not -n <= i < n]
    if bad:
        raise ValueError(f"HedgehogConfig.layers: {bad} out of range for {n} attention site(s){listing}")
    for g in (config.sites or ()):
        if not any(fnmatch.fnmatchcase(p, g) for p in paths):
            raise ValueError(f"HedgehogConfig.sites: {g!r} matches no site{listing}")
    chosen = []
    layers = None if config.layers is None else {i % n for i in config.layers}
    for i, p in enumerate(paths):
        if config.sites is not None and not any(fnmatch.fnmatchcase(p, g) for g in config.sites):
            continue
        if any(fnmatch.fnmatchcase(p, g) for g in config.exclude):
            continue
        if layers is not None and i not in layers:
            continue
        chosen.append(i)
    return chosen
