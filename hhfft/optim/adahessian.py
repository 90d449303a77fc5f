"""AdaHessian (Yao et al., 2021): Adam whose second moment is the square of a Hutchinson estimate of diag(H).

The maths, the official code it follows and the defects it does not copy are in ``hhfft/kernels/adahessian/README.md``.
"""
from __future__ import annotations

import dataclasses
import itertools
import warnings
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from torch import Tensor

from hhfft.kernels.adahessian.step import _foreach_update, adahessian_update, adahessian_update_fused
from hhfft.optim.hutchinson import (
    HutchinsonResult, _average_over_ranks, _check_params, _compiled, _count_hvp, _cudagraphs, _grad_or_hvp,
    _options_key, _probes, hutchinson, rademacher,
)

__all__ = ["AdaHessian"]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _state_dtype(p: Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def average_curvature(d: Tensor, block_length: Optional[int], dtype: torch.dtype) -> Tensor:
    """Dbar from the raw Hutchinson D: |D|, averaged over the kernel dims of conv weights (ndim >= 3, kept as size-1
    dims so it broadcasts), over blocks of ``block_length`` consecutive entries of 2-D tensors if given.

    Where nothing is averaged, D itself is returned (cast to ``dtype``): the update only uses Dbar^2 = D^2.
    """
    if d.requires_grad:
        d = d.detach()
    if d.dtype != dtype:
        d = d.to(dtype)
    if d.dim() < 2 or (d.dim() == 2 and block_length is None):
        return d
    a = d.abs()
    if a.dim() >= 3:
        return a.mean(dim=tuple(range(2, a.dim())), keepdim=True)
    if a.dim() == 2 and block_length is not None:
        blocks = a.reshape(-1, block_length).mean(dim=1, keepdim=True)
        return blocks.expand(-1, block_length).reshape(a.shape)
    return a


def _check_hyperparameters(group: Mapping[str, Any]) -> None:
    """The constructor's checks, for every group (``add_param_group`` included)."""
    lr, eps, betas = group["lr"], group["eps"], group["betas"]
    wd, k, b = group["weight_decay"], group["hessian_power"], group["block_length"]
    if isinstance(lr, bool) or not isinstance(lr, (int, float, Tensor)) or not 0.0 <= float(lr):
        raise ValueError(f"Invalid learning rate: {lr!r} (expected a float >= 0)")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps} (expected >= 0)")
    if len(betas) != 2 or not all(0.0 <= x < 1.0 for x in betas):
        raise ValueError(f"Invalid betas: {betas} (expected two floats in [0, 1))")
    if not 0.0 <= wd:
        raise ValueError(f"Invalid weight_decay value: {wd} (expected >= 0)")
    if not 0.0 <= k <= 1.0:
        raise ValueError(f"Invalid Hessian power value: {k} (expected a float in [0, 1])")
    if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
        raise ValueError(f"Invalid block_length: {b!r} (expected None or an int >= 1)")


@dataclasses.dataclass
class _Bucket:
    """Parameters updated by one call of the update: one group, device and state dtype."""

    group: Dict[str, Any]
    device: torch.device
    dtype: torch.dtype
    index: List[int] = dataclasses.field(default_factory=list)  # positions in the step's parameter list
    params: List[Tensor] = dataclasses.field(default_factory=list)
    exp_avgs: List[Tensor] = dataclasses.field(default_factory=list)
    exp_sqs: List[Tensor] = dataclasses.field(default_factory=list)
    steps: List[Tensor] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Layout:
    key: Tuple[int, ...]  # ids of the stepping parameters
    states: List[Dict[str, Any]]  # per stepping parameter
    tensors: List[Tuple[Tensor, Tensor, Tensor]]  # per stepping parameter: its exp_avg, exp_hessian_diag_sq, step
    buckets: List[_Bucket]


class AdaHessian(torch.optim.Optimizer):
    """AdaHessian with a Hutchinson curvature estimate and a compiled, fused update.

    Per parameter: D = mean_s z_s * (H z_s) with Rademacher z from the optimizer's own generator; Dbar = |D| averaged
    over the kernel dims of conv weights (any rank) or over ``block_length`` blocks of 2-D weights;
    m = b1 m + (1-b1) g, v = b2 v + (1-b2) Dbar^2, p -= lr * (m_hat / (v_hat^(k/2) + eps) + weight_decay * p).

    Curvature, three ways:

    1. official usage: ``loss.backward(create_graph=True); opt.step()`` (H z by ``torch.autograd.grad``);
    2. closure: ``opt.step(closure)`` where the closure zeroes grads, calls ``backward(create_graph=True)``, returns loss;
    3. functional, for models compiled with ``backend="hhfft"`` (which cannot be double-backwarded):
       ``res = hhfft.optim.hutchinson(loss_fn, params, generator=opt.generator, n_samples=opt.n_samples,
       backend="hhfft"); opt.step(hessian=res)``, or the same with the update compiled into the HVP's graph:
       ``opt.hutchinson_step(loss_fn, params, backend="hhfft")``.

    With ``update_each=k`` the curvature is computed on every k-th step only and reused in between; check
    ``opt.hessian_due`` to know whether the next step needs a graph (``loss.backward(create_graph=opt.hessian_due)``).

    Distributed data parallel (torchrun): do not wrap the model in DDP for the curvature step (DDP's reducer rejects
    ``backward(create_graph=True)``). Broadcast the initial parameters once; then under an initialised process
    group ``step()`` averages the gradients and D over the ranks (one all-reduce each), and the probes are the same
    on every rank (the default generator's seed is broadcast from rank 0). The functional path averages in
    :func:`hutchinson` instead.

    Args:
        params: iterable of parameters or of dicts defining parameter groups
        lr: learning rate (a float; kept in a device tensor, so changing it never recompiles the fused step)
        betas: coefficients of the running averages of g and Dbar^2
        eps: added to the denominator
        weight_decay: decoupled weight decay (``p -= lr * weight_decay * p``)
        hessian_power: k in ``v_hat^(k/2)``, in [0, 1]
        update_each: compute the curvature every ``update_each`` steps, reuse it in between
        n_samples: probes averaged per curvature estimate
        block_length: average |D| of 2-D parameters over blocks of this many consecutive entries (fairseq variant)
        generator: ``torch.Generator`` for the probes; default: one on the parameters' device seeded with
            ``torch.initial_seed()`` (of rank 0 under torch.distributed)
        fused: run the update as one compiled multi-tensor step (True) or the eager per-parameter reference (False)

    Example:
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = AdaHessian(model.parameters(), lr=0.1, fused=False)
        >>> loss = model(torch.randn(8, 4)).pow(2).mean()
        >>> loss.backward(create_graph=True)
        >>> opt.step()
        >>> opt.zero_grad()
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.15,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-4,
        weight_decay: float = 0.0,
        hessian_power: float = 1.0,
        update_each: int = 1,
        n_samples: int = 1,
        block_length: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        fused: bool = True,
    ) -> None:
        if isinstance(lr, Tensor):
            raise ValueError(f"Invalid learning rate: {lr!r} (expected a float >= 0)")
        if not isinstance(update_each, int) or update_each < 1:
            raise ValueError(f"Invalid update_each: {update_each!r} (expected an int >= 1)")
        if not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"Invalid n_samples: {n_samples!r} (expected an int >= 1)")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if not isinstance(fused, bool):
            raise TypeError(f"fused must be a bool, got {fused!r}")
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
            hessian_power=hessian_power, block_length=block_length,
        )
        self.update_each = update_each
        self.n_samples = n_samples
        self.fused = fused
        self._generator = generator
        self._hessian_step = 0  # steps taken; the curvature is computed when this is a multiple of update_each
        # (group id, device, dtype) -> [0-d tensor, its value]: one per bucket, as a fused iteration reads them all
        self._lr_tensors: Dict[Tuple[int, torch.device, torch.dtype], List[Any]] = {}
        self._layout: Optional[_Layout] = None  # the buckets of the last step, reused while the same params step
        self._grown = False  # a group was added after construction: the next step needs the curvature
        self._fused_hypers: Optional[tuple] = None  # the constants of hutchinson_step's last compiled iteration
        super().__init__(params, defaults)
        self._grown = False

    # ------------------------------------------------------------------------------------------- param groups
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """As torch.optim's, with every hyperparameter of the group checked before the group is added."""
        group = dict(self.defaults, **{k: v for k, v in param_group.items() if k != "params"})
        _check_hyperparameters(group)
        params = param_group["params"]
        if isinstance(params, set):  # unordered: torch.optim's own check raises
            return super().add_param_group(param_group)
        params = [params] if isinstance(params, Tensor) else list(params)  # a generator is read once, here
        b = group["block_length"]
        for p in params:
            if b is not None and p.dim() == 2 and p.numel() % b != 0:
                raise ValueError(
                    f"block_length={b} does not divide the {p.numel()} entries of a parameter of shape "
                    f"{tuple(p.shape)}; choose a divisor of every 2-D parameter's size, or block_length=None"
                )
        super().add_param_group(dict(param_group, params=params))
        self._layout = None
        self._grown = True

    # --------------------------------------------------------------------------------------------- generator
    @property
    def generator(self) -> torch.Generator:
        """The probes' generator (created on first use when none was given)."""
        if self._generator is None:
            device = next(p.device for g in self.param_groups for p in g["params"])
            seed = torch.initial_seed()
            if _distributed():
                box = [seed]
                dist.broadcast_object_list(box, src=0)
                seed = box[0]
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(seed % (2**63))
        return self._generator

    @property
    def hessian_due(self) -> bool:
        """Whether the next ``step()`` computes the curvature (so the gradient must carry a graph).

        Also true when a group has been added since the last curvature step, or a trainable parameter that stepped
        before has no stored curvature. A parameter that gets its first gradient between curvature steps cannot be
        foreseen: that ``step()`` raises, asking for the graph.
        """
        if self._hessian_step % self.update_each == 0 or self._grown:
            return True
        # a parameter that has stepped but holds no curvature (it had no gradient on the last curvature step); one
        # that never had a gradient does not count (an unused head would make every step due), nor one frozen since
        # (a frozen backbone would)
        return any(p.requires_grad and "exp_avg" in st and "hessian_diag" not in st for p, st in self.state.items())

    # ----------------------------------------------------------------------------------------------- curvature
    def _hutchinson(self, params: List[Tensor], grads: List[Tensor]) -> List[Tensor]:
        """D per parameter, up to sign (only |D| is used): z * Hz averaged over the probes, or Hz for one probe."""
        with_graph = [i for i, g in enumerate(grads) if g.grad_fn is not None]
        if not with_graph:
            raise ValueError(
                "AdaHessian.step() needs the curvature on this step but the gradients carry no graph: call "
                "loss.backward(create_graph=True) (or pass a closure that does), or compute it with "
                "hhfft.optim.hutchinson(...) and call step(hessian=result). With update_each > 1, use "
                "backward(create_graph=opt.hessian_due); a step between curvature steps also needs the graph when "
                "a parameter gets its first gradient there (it has no curvature yet)"
            )
        if self.n_samples == 1:
            # One probe: only |D| = |z * Hz| = |Hz| is ever used (z = +-1), so keep Hz and skip a pass over memory.
            zs = rademacher(params, self.generator)
            hz = torch.autograd.grad(
                [grads[i] for i in with_graph], [params[i] for i in with_graph],
                grad_outputs=[zs[i] for i in with_graph], allow_unused=True,
            )
            _count_hvp()
            out = [torch.zeros_like(p) for p in params] if len(with_graph) < len(params) else [None] * len(params)
            for i, h in zip(with_graph, hz):
                # detach: autograd.grad returns views of its buffers; the compiled step gets plain tensors
                out[i] = torch.zeros_like(params[i]) if h is None else h.detach()
            return out
        mean = [torch.zeros_like(p) for p in params]
        for s in range(self.n_samples):
            zs = rademacher(params, self.generator)
            hz = torch.autograd.grad(
                [grads[i] for i in with_graph],
                [params[i] for i in with_graph],
                grad_outputs=[zs[i] for i in with_graph],
                retain_graph=s < self.n_samples - 1,
                allow_unused=True,
            )
            _count_hvp()
            for i, h in zip(with_graph, hz):
                if h is not None:
                    # running mean: exact when every probe gives the same value (a diagonal Hessian)
                    mean[i].add_(zs[i] * h.detach() - mean[i], alpha=1 / (s + 1))
        return mean

    @staticmethod
    def _given_hessian(hessian: Any, params: List[Tensor]) -> List[Tensor]:
        by_param: Mapping[Tensor, Tensor]
        if isinstance(hessian, HutchinsonResult):
            by_param = hessian.hessian_by_param
        elif isinstance(hessian, Mapping):
            by_param = hessian
        else:
            raise TypeError(
                f"hessian must be a HutchinsonResult or a mapping {{parameter: D}}, got {type(hessian).__name__}"
            )
        out = [by_param.get(p) for p in params]
        missing = [tuple(p.shape) for p, d in zip(params, out) if d is None]
        if missing:
            raise ValueError(
                f"hessian has no entry for {len(missing)} parameter(s) with a gradient (shapes {missing[:3]}...): "
                "compute it over every parameter the optimizer updates"
            )
        return out

    def _layout_for(self, params: List[Tensor]) -> "_Layout":
        """The buckets for this set of stepping parameters: built (and missing state created) on the first step with
        this set, then reused while every parameter's state holds the same tensors, so a step regroups nothing. A
        state the user cleared, replaced or refilled with other tensors (e.g. moved to the CPU and back) rebuilds."""
        key = tuple(map(id, params))
        lay = self._layout
        if lay is not None and lay.key == key and all(
            self.state.get(p) is st and st.get("exp_avg") is t[0] and st.get("exp_hessian_diag_sq") is t[1]
            and st.get("step") is t[2] for p, st, t in zip(params, lay.states, lay.tensors)
        ):
            return lay
        group_of = {id(p): group for group in self.param_groups for p in group["params"]}
        states, buckets = [], {}
        for i, p in enumerate(params):
            group, state, sdt = group_of[id(p)], self.state[p], _state_dtype(p)
            if "exp_avg" not in state:
                state["step"] = torch.zeros((), dtype=sdt, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, dtype=sdt, memory_format=torch.preserve_format)
                state["exp_hessian_diag_sq"] = torch.zeros_like(p, dtype=sdt, memory_format=torch.preserve_format)
            states.append(state)
            b = buckets.setdefault((id(group), p.device, sdt), _Bucket(group, p.device, sdt))
            b.index.append(i)
            b.params.append(p)
            for lst, k in zip((b.exp_avgs, b.exp_sqs, b.steps), ("exp_avg", "exp_hessian_diag_sq", "step")):
                lst.append(state[k])
        tensors = [(st["exp_avg"], st["exp_hessian_diag_sq"], st["step"]) for st in states]
        self._layout = _Layout(key, states, tensors, list(buckets.values()))
        return self._layout

    def _lr(self, group: Dict[str, Any], device: torch.device, dtype: torch.dtype) -> Tensor:
        """The 0-d learning-rate tensor of this group, device and dtype, refilled only when its value changed."""
        value = group["lr"]
        box = self._lr_tensors.get((id(group), device, dtype))
        if box is None:
            box = self._lr_tensors[(id(group), device, dtype)] = [torch.zeros((), dtype=dtype, device=device), None]
        if isinstance(value, Tensor) or box[1] != value:
            box[0].fill_(value)
            box[1] = None if isinstance(value, Tensor) else value
        return box[0]

    # ---------------------------------------------------------------------------------------------------- step
    def step(self, closure: Optional[Callable[[], Tensor]] = None, *, hessian: Any = None) -> Optional[Tensor]:
        """One AdaHessian step.

        Args:
            closure: re-evaluates the model: zero the grads, ``loss.backward(create_graph=True)``, return the loss
            hessian: precomputed D per parameter (a :class:`HutchinsonResult` or ``{parameter: D}``), for the
                functional path; the gradients are then read from ``.grad`` as usual
        Returns:
            the closure's loss, if a closure was given
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        if _distributed():
            self._fill_missing_grads()
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return loss
        layout = self._layout_for(params)
        grads = [p.grad for p in params]

        due = self._due(layout)
        if hessian is not None:
            raw = self._given_hessian(hessian, params)
        elif due:
            raw = self._hutchinson(params, grads)
        else:
            raw = None
        # Detach the gradients: a create_graph gradient keeps the whole double-backward graph (and a reference cycle).
        for i, p in enumerate(params):
            if grads[i].requires_grad:
                p.grad = grads[i] = grads[i].detach()
        if hessian is None and _distributed():
            grads = _average_over_ranks(grads)
            if raw is not None:
                raw = _average_over_ranks(raw)

        self._update(layout, grads, raw, given=hessian is not None)
        return loss

    def _due(self, layout: "_Layout") -> bool:
        """Whether this step, with the parameters of ``layout`` stepping, computes the curvature: on every
        ``update_each``-th step, or when one of them has no stored curvature."""
        return self._hessian_step % self.update_each == 0 or any("hessian_diag" not in st for st in layout.states)

    def _update(self, layout: "_Layout", grads: List[Tensor], raw: Optional[List[Tensor]], *, given: bool) -> None:
        """The update of every bucket from the gradients and the raw curvature ``raw`` (None: the stored Dbar), then
        the step count and the stored curvature's lifetime. ``given``: ``raw`` belongs to the caller."""
        update = adahessian_update_fused if self.fused else adahessian_update
        for b in layout.buckets:
            group = b.group
            if raw is not None:
                dbars = [average_curvature(raw[i], group["block_length"], b.dtype) for i in b.index]
                if self.update_each > 1:
                    for i, d in zip(b.index, dbars):
                        # kept for later steps: not the caller's tensor (a CUDA-graph output is overwritten by the
                        # next replay)
                        layout.states[i]["hessian_diag"] = d.clone() if given and d is raw[i] else d
            else:
                dbars = [layout.states[i]["hessian_diag"] for i in b.index]
            beta1, beta2 = group["betas"]
            update(
                b.params, [grads[i] for i in b.index], dbars, b.exp_avgs, b.exp_sqs, b.steps,
                self._lr(group, b.device, b.dtype),
                beta1=beta1, beta2=beta2, eps=group["eps"],
                weight_decay=group["weight_decay"], hessian_power=group["hessian_power"],
            )
        self._stepped(curvature=raw is not None)

    def _stepped(self, *, curvature: bool) -> None:
        if curvature:
            self._grown = False
        self._hessian_step += 1
        if self.update_each > 1 and self._hessian_step % self.update_each == 0:
            # The next step computes a new curvature: drop the stored one now, so that it is not held while the
            # next backward(create_graph=True) or hutchinson() runs (one parameter-sized buffer less at the peak).
            for state in self.state.values():
                state.pop("hessian_diag", None)

    def hutchinson_step(
        self,
        loss_fn: Callable[[Any], Tensor],
        params: Any,
        *,
        backend: Optional[str] = "inductor",
        options: Optional[dict] = None,
    ) -> Tensor:
        """One whole AdaHessian iteration on a functional loss: gradient, curvature (on the steps that need it) and
        update, compiled as ONE function, so that neither the gradient nor D is written out and read back, and
        ``.grad`` is neither read nor written.

        Computes what ``res = hutchinson(loss_fn, params, generator=opt.generator, ...); opt.step(hessian=res)``
        with fresh ``.grad`` computes (the same probes, drawn from ``opt.generator``; compiled, to rounding: the
        gradient of a low-precision parameter is not rounded to its dtype before the update), and that pair is
        what runs where one graph cannot hold the whole iteration: ``fused=False``, ``n_samples > 1``, or
        torch.distributed (the gradient and D are averaged over the ranks between the HVP and the update).
        Every parameter in ``params`` that requires a gradient steps on every call (one the loss does not read
        gets a zero gradient, as from :func:`hutchinson`). lr may change between calls; betas, eps, weight_decay
        and hessian_power are constants of the compiled iteration (a change compiles it again, with a warning).

        Args:
            loss_fn: ``loss_fn(params) -> 0-d loss``, as for :func:`hutchinson` (``torch.func.functional_call``)
            params: a dict ``{name: tensor}`` or a sequence of tensors; every one that requires a gradient must
                belong to this optimizer (those are updated in place); the others are constants
            backend: torch.compile backend (``"hhfft"`` for a model meant to run through hhfft's rewrites), or None
                to run eagerly
            options: the backend's options, as for :func:`hutchinson` (``{"triton.cudagraphs": True}``)
        Returns:
            the loss (0-d, detached), computed at the parameters before the update
        """
        leaves, spec = pytree.tree_flatten(params)
        _check_params(leaves, "AdaHessian.hutchinson_step")
        key = _options_key(options)
        mine = {id(p) for group in self.param_groups for p in group["params"]}
        foreign = [tuple(p.shape) for p in leaves if p.requires_grad and id(p) not in mine]
        if foreign:
            raise ValueError(
                f"AdaHessian.hutchinson_step: {len(foreign)} tensor(s) of params require a gradient but are not "
                f"parameters of this optimizer (shapes {foreign[:3]}); add them to the optimizer, or set "
                "requires_grad=False on those meant as constants"
            )
        pos = [i for i, p in enumerate(leaves) if p.requires_grad]
        stepping = [leaves[i] for i in pos]
        layout = self._layout_for(stepping)
        due = self._due(layout)
        detached = [p.detach() for p in leaves]
        graphed = backend is not None and _cudagraphs(options)  # outputs overwritten by the graph's next replay
        if not self.fused or self.n_samples > 1 or _distributed():
            if due:
                res = hutchinson(loss_fn, params, generator=self.generator, n_samples=self.n_samples,
                                 backend=backend, options=options, set_grad=False)
                loss, grads, raw = res.loss, pytree.tree_leaves(res.grads), pytree.tree_leaves(res.hessian)
                raw = [raw[i] for i in pos]
            else:
                fn = _grad_or_hvp if backend is None else _compiled(_grad_or_hvp, backend, key)
                loss, grads, _ = fn(loss_fn, pytree.tree_unflatten(detached, spec), None)
                grads, raw = pytree.tree_leaves(grads), None
                if _distributed():
                    grads = _average_over_ranks(grads)
            self._update(layout, [grads[i].detach() for i in pos], raw, given=graphed)
            return loss.detach().clone() if graphed else loss.detach()

        fn = _fused_iteration if backend is None else _compiled(_fused_iteration, backend, key)
        probe = None
        if due:  # the probes hutchinson() would draw: the same stream, zeros for the constants
            probe = pytree.tree_unflatten(_probes(leaves, [p.requires_grad for p in leaves], self.generator), spec)
            _count_hvp()
        hypers = tuple((*b.group["betas"], b.group["eps"], b.group["weight_decay"], b.group["hessian_power"],
                        b.group["block_length"], b.dtype) for b in layout.buckets)
        buckets = tuple(
            (tuple(pos[i] for i in b.index), b.exp_avgs, b.exp_sqs, b.steps, self._lr(b.group, b.device, b.dtype), h,
             None if due else [layout.states[i]["hessian_diag"] for i in b.index])
            for b, h in zip(layout.buckets, hypers)
        )
        keep = due and self.update_each > 1
        if graphed:
            # CUDA graphs replay only functions whose mutated inputs keep their addresses, declared static: the
            # parameters and the state do. (The stored curvature is not mutated, and it is a new tensor on every
            # curvature step: declared static, it would make the graph be recorded again each time.)
            for t in itertools.chain(detached, *(b.exp_avgs + b.exp_sqs + b.steps for b in layout.buckets)):
                torch._dynamo.mark_static_address(t)
        last = self._fused_hypers
        if backend is not None and last is not None and len(last) == len(hypers) and last != hypers:
            warnings.warn(
                "AdaHessian.hutchinson_step: betas, eps, weight_decay or hessian_power changed, and they are "
                "constants of the compiled iteration: it compiles again, forward and HVP included (past "
                "torch.compile's recompile limit, it runs eagerly). Keep them fixed; lr may change freely.",
                stacklevel=2)
        self._fused_hypers = hypers
        loss, kept = fn(loss_fn, pytree.tree_unflatten(detached, spec), probe, buckets, keep)
        if keep:
            for b, dbars in zip(layout.buckets, kept):
                for i, d in zip(b.index, dbars):
                    layout.states[i]["hessian_diag"] = d.clone() if graphed else d
        self._stepped(curvature=due)
        return loss.detach().clone() if graphed else loss.detach()

    def _fill_missing_grads(self) -> None:
        """Under torch.distributed every rank must all-reduce the same parameters in the same order: a parameter that
        has a gradient on some rank gets zeros where it has none (as DDP with find_unused_parameters); one without a
        gradient on any rank is skipped everywhere (one all-reduce of a flag per parameter)."""
        candidates = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        if not candidates:
            return
        has = torch.tensor([p.grad is not None for p in candidates], dtype=torch.int32,
                           device=next((p.grad.device for p in candidates if p.grad is not None), candidates[0].device))
        dist.all_reduce(has, op=dist.ReduceOp.MAX)
        for p, h in zip(candidates, has.tolist()):
            if h and p.grad is None:
                p.grad = torch.zeros_like(p)

    # ---------------------------------------------------------------------------------------------- state dict
    def state_dict(self) -> Dict[str, Any]:
        sd = super().state_dict()
        sd["hhfft"] = {"hessian_step": self._hessian_step, "generator_state": self.generator.get_state()}
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        sd = dict(state_dict)
        extra = sd.pop("hhfft", {})
        super().load_state_dict(sd)
        self._layout = None
        # torch.optim casts floating state to the parameter's dtype; AdaHessian keeps fp32 state for fp16/bf16
        # parameters, so take the saved tensors again, moved but not cast.
        saved_ids = itertools.chain.from_iterable(g["params"] for g in sd["param_groups"])
        params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        for sid, p in zip(saved_ids, params):
            for k, v in sd["state"].get(sid, {}).items():
                if isinstance(v, Tensor):
                    self.state[p][k] = v.detach().to(device=p.device).clone()
        self._hessian_step = int(extra.get("hessian_step", 0))
        if "generator_state" in extra:
            self.generator.set_state(extra["generator_state"])


def _fused_iteration(loss_fn: Callable, params: Any, probe: Any, buckets: tuple, keep: bool):
    """Loss, gradient, H z (probe given) and the update of every bucket, as one function to compile. One probe:
    only |D| = |z * Hz| = |Hz| is used (z = +-1), so Hz stands for D. Returns the loss and, with ``keep``, each
    bucket's new Dbar."""
    loss, grads, hz = _grad_or_hvp(loss_fn, params, probe)
    leaves, g = pytree.tree_leaves(params), pytree.tree_leaves(grads)
    h = None if hz is None else pytree.tree_leaves(hz)
    kept = []
    for index, exp_avgs, exp_sqs, steps, lr, (b1, b2, eps, wd, k, block, dtype), stored in buckets:
        dbars = stored if h is None else [average_curvature(h[i], block, dtype) for i in index]
        _foreach_update([leaves[i] for i in index], [g[i] for i in index], dbars, exp_avgs, exp_sqs, steps, lr,
                        b1, b2, eps, wd, k)
        kept.append(dbars if keep else None)
    return loss, kept
