"""Hutchinson's estimator of the Hessian diagonal, D = E[z * (H z)] over Rademacher probes z.

Two ways to get H z:
- from a gradient built with ``loss.backward(create_graph=True)``: ``torch.autograd.grad(g, p, z)`` (reverse over
  reverse; what :class:`hhfft.optim.AdaHessian` does inside ``step()``);
- :func:`hutchinson`: ``torch.func.jvp(torch.func.grad(f))`` (forward over reverse), optionally compiled. This is the
  path for models compiled with ``backend="hhfft"``: AOTAutograd cannot double-backward a compiled graph, but Dynamo
  can trace jvp-of-grad and hand the whole forward-over-reverse computation to the backend.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from torch import Tensor

__all__ = ["rademacher", "hutchinson", "HutchinsonResult"]


def rademacher(tensors: Sequence[Tensor], generator: Optional[torch.Generator] = None) -> List[Tensor]:
    """One Rademacher probe per tensor (entries exactly +1 or -1, equally likely), in the tensors' dtypes and devices.

    The probes for all tensors come from ONE draw of ``sum(numel)`` values from ``generator`` (on the generator's
    device), in the order given, so the same generator state gives the same probes in every code path and on every
    rank.

    Args:
        tensors: [*] each
        generator: a ``torch.Generator``; None uses the global RNG of the first tensor's device
    Returns:
        list of probes, ``z[i]`` shaped and typed like ``tensors[i]``
    """
    tensors = list(tensors)
    if not tensors:
        return []
    device = generator.device if generator is not None else tensors[0].device
    total = sum(t.numel() for t in tensors)
    # the bits as bytes, then +1/-1 in one pass: 6 bytes of traffic per entry instead of 12 (a float32 draw, then
    # 2 * flat - 1 in place); the AdaHessian iteration draws one probe per parameter every step
    bits = torch.randint(0, 2, (total,), generator=generator, device=device, dtype=torch.uint8)
    one = torch.ones((), device=device)
    flat = torch.where(bits.view(torch.bool), one, -one)
    del bits
    out, offset = [], 0
    for t in tensors:
        z = flat[offset : offset + t.numel()].view(t.shape)
        offset += t.numel()
        out.append(z.to(device=t.device, dtype=t.dtype))
    return out


def _count_hvp(n: int = 1) -> None:
    torch._dynamo.utils.counters["hhfft"]["adahessian_hvp"] += n


def _forward_over_reverse(loss_fn: Callable, params: Any, probe: Any):
    """Loss, gradient and z * (H z): the product is taken in the same graph, so a compiled backend writes it over
    H z's buffer (one parameter-sized buffer less than a separate multiply after the call)."""
    loss, grads, hz = _grad_or_hvp(loss_fn, params, probe)
    return loss, grads, pytree.tree_map(torch.mul, probe, hz)


def _grad_or_hvp(loss_fn: Callable, params: Any, probe: Any):
    """Loss, gradient and H z (probe given) or None (probe None)."""
    if probe is None:
        grads, loss = torch.func.grad_and_value(loss_fn)(params)
        return loss, grads, None
    (grads, loss), (hz, _) = torch.func.jvp(torch.func.grad_and_value(loss_fn), (params,), (probe,))
    return loss, grads, hz


@functools.lru_cache(maxsize=None)
def _compiled(fn: Callable, backend: str, options: Optional[tuple]):
    return torch.compile(fn, backend=backend, dynamic=False, options=None if options is None else dict(options))


def _options_key(options: Optional[dict]) -> Optional[tuple]:
    if options is not None and not isinstance(options, dict):
        raise TypeError(f"options must be a dict (the backend's options) or None, got {type(options).__name__}")
    key = None if options is None else tuple(sorted(options.items()))
    try:
        hash(key)
    except TypeError:
        raise TypeError(f"options must be a dict of hashable values (numbers, strings, tuples), got {options!r}") \
            from None
    return key


def _check_params(leaves: List[Any], caller: str) -> None:
    if not leaves or not all(isinstance(x, Tensor) and x.is_floating_point() for x in leaves):
        raise TypeError(f"{caller}: params must be a non-empty dict or sequence of floating-point tensors")
    trainable = [id(p) for p in leaves if p.requires_grad]
    if not trainable:
        raise ValueError(f"{caller}: no parameter requires a gradient (every one has requires_grad=False)")
    if len(set(trainable)) != len(trainable):
        raise ValueError(f"{caller}: a tensor appears more than once in params; pass each parameter once "
                         "(dict(model.named_parameters()) does; torch.func.functional_call ties shared weights)")


@dataclasses.dataclass
class HutchinsonResult:
    """What :func:`hutchinson` returns; ``grads`` and ``hessian`` have the structure of the ``params`` it was given.

    Attributes:
        loss: the loss value (0-d, detached)
        grads: dL/dp per parameter
        hessian: D = mean over probes of z * (H z) per parameter (raw: no absolute value, no spatial averaging)
        params: the parameter tensors, flattened in pytree order (``hessian_by_param`` keys)
    """

    loss: Tensor
    grads: Any
    hessian: Any
    params: List[Tensor]

    @property
    def hessian_by_param(self) -> Dict[Tensor, Tensor]:
        """``{parameter: D}`` for the parameters that require a gradient, the form :meth:`AdaHessian.step` takes as
        ``hessian=``."""
        return {p: d for p, d in zip(self.params, pytree.tree_leaves(self.hessian)) if p.requires_grad}


def hutchinson(
    loss_fn: Callable[[Any], Tensor],
    params: Any,
    *,
    generator: Optional[torch.Generator] = None,
    n_samples: int = 1,
    probes: Optional[Sequence[Any]] = None,
    backend: Optional[str] = "inductor",
    options: Optional[dict] = None,
    set_grad: bool = True,
) -> HutchinsonResult:
    """Loss, gradient and Hutchinson diagonal D = mean_s z_s * (H z_s) by forward-over-reverse differentiation.

    ``H z`` is ``torch.func.jvp(torch.func.grad(loss_fn), (params,), (z,))``, compiled with ``backend`` (one graph
    computes loss, gradient and H z). Use ``backend="hhfft"`` for a model meant to run through the hhfft rewrites:
    call the model inside ``loss_fn`` with ``torch.func.functional_call`` (a module already wrapped by
    ``torch.compile`` is traced through, so the outer backend decides).

    Args:
        loss_fn: ``loss_fn(params) -> 0-d loss``; ``params`` arrives with the structure given here
        params: a dict ``{name: tensor}`` or a sequence of tensors (e.g. ``dict(model.named_parameters())``); those
            with ``requires_grad=False`` are constants, as for ``backward()``: no probe (their D is 0), no ``.grad``
        generator: source of the Rademacher probes (pass ``opt.generator`` to share the optimizer's stream)
        n_samples: number of probes averaged
        probes: explicit probes instead of drawing them: ``n_samples`` pytrees shaped like ``params``
        backend: torch.compile backend, or None to run eagerly
        options: the backend's options (``torch.compile(..., options=...)``); with Inductor,
            ``{"triton.cudagraphs": True}`` replays the call from a CUDA graph, for hosts slower at launching its
            kernels than the GPU is at running them (the returned tensors live in the graph's memory pool until the
            next call; ``.grad`` gets a copy)
        set_grad: accumulate the gradient into each parameter's ``.grad`` (like ``backward()``); where ``.grad``
            was None it becomes the returned gradient tensor itself (no copy), as with ``backward()``
    Returns:
        :class:`HutchinsonResult`. Under torch.distributed with more than one rank the gradient and D are averaged
        over the ranks, so that each rank holds the values of the global batch.

    Example:
        >>> w = torch.randn(3, requires_grad=True)
        >>> res = hutchinson(lambda ps: (ps["w"] ** 4).sum(), {"w": w}, backend=None)
        >>> torch.allclose(res.hessian["w"], 12 * w.detach() ** 2)
        True
    """
    if not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"hutchinson: n_samples must be an int >= 1, got {n_samples!r}")
    leaves, spec = pytree.tree_flatten(params)
    _check_params(leaves, "hutchinson")
    if probes is not None:
        probes = list(probes)
        n_samples = len(probes)
        if not probes:
            raise ValueError("hutchinson: probes is empty; give at least one probe (a pytree shaped like params)")
    trainable = [p.requires_grad for p in leaves]
    key = _options_key(options)
    fn = _forward_over_reverse if backend is None else _compiled(_forward_over_reverse, backend, key)
    detached = pytree.tree_unflatten([p.detach() for p in leaves], spec)
    loss = grads = None
    total: Optional[List[Tensor]] = None
    for s in range(n_samples):
        if probes is None:
            z = _probes(leaves, trainable, generator)
        else:  # a frozen leaf is a constant whatever probe is given for it
            z = [x if t else torch.zeros_like(x) for x, t in zip(pytree.tree_flatten(probes[s])[0], trainable)]
        loss_s, g, d = fn(loss_fn, detached, pytree.tree_unflatten(list(z), spec))
        del z  # the probes are not needed any more: free them before the next draw
        _count_hvp()
        d = [x.detach() for x in pytree.tree_leaves(d)]
        # running mean: exact when every probe gives the same value (a diagonal Hessian)
        total = d if total is None else [m + (x - m) / (s + 1) for m, x in zip(total, d)]
        if s == 0:
            loss, grads = loss_s.detach(), [x.detach() for x in pytree.tree_leaves(g)]
    hess = total
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        grads, hess = _average_over_ranks(grads), _average_over_ranks(hess)
    del g, loss_s  # the last call's outputs: from here on only `grads` and `hess` hold them
    if set_grad:
        # CUDA-graph outputs live in the graph's pool and are overwritten by its next replay: always copied
        steal = backend is None or not _cudagraphs(options)
        for p, g in zip(leaves, grads):
            if not p.requires_grad:
                continue
            if p.grad is None:
                p.grad = g if steal and _own_buffer(g, p) else g.clone()
            else:
                p.grad.add_(g)
    return HutchinsonResult(
        loss=loss,
        grads=pytree.tree_unflatten(grads, spec),
        hessian=pytree.tree_unflatten(hess, spec),
        params=leaves,
    )


def _probes(leaves: List[Tensor], trainable: List[bool], generator: Optional[torch.Generator]) -> List[Tensor]:
    """Rademacher probes for the parameters that require a gradient (the stream ``backward()``'s path draws), zeros
    for the others."""
    drawn = iter(rademacher([p for p, t in zip(leaves, trainable) if t], generator))
    return [next(drawn) if t else torch.zeros_like(p) for p, t in zip(leaves, trainable)]


def _cudagraphs(options: Optional[dict]) -> bool:
    """Whether Inductor would run the compiled function under CUDA graphs (its option, else its global config)."""
    from torch._inductor import config

    return bool((options or {}).get("triton.cudagraphs", config.triton.cudagraphs))


def _own_buffer(g: Tensor, p: Tensor) -> bool:
    """Whether ``g`` can become ``p.grad`` without a copy (as ``backward()`` steals a gradient nobody else holds):
    laid out like ``p``, covering its whole storage, and that storage referenced by ``g`` alone (a function can
    return an input, or one buffer for two gradients, or a view of a bucket: those are copied)."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None or g.stride() != p.stride() or g.storage_offset() != 0:
        return False
    storage = g.untyped_storage()
    return storage.nbytes() == g.numel() * g.element_size() and use_count(storage._cdata) == _sole_owner_count()


@functools.lru_cache(maxsize=None)
def _sole_owner_count() -> int:
    """The storage use count of a tensor nobody else holds, as _own_buffer reads it (calibrated, not assumed: one
    TensorImpl plus the Python storage object made to read it, 2 on torch 2.13)."""
    t = torch.empty(1)
    storage = t.untyped_storage()
    return torch._C._storage_Use_Count(storage._cdata)


def _average_over_ranks(tensors: List[Tensor]) -> List[Tensor]:
    """Mean over the default process group, one all-reduce per (device, dtype) bucket."""
    if not tensors:
        return tensors
    world = dist.get_world_size()
    out: List[Optional[Tensor]] = [None] * len(tensors)
    buckets: Dict[Any, List[int]] = {}
    for i, t in enumerate(tensors):
        buckets.setdefault((t.device, t.dtype), []).append(i)
    for idx in buckets.values():
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in idx])
        dist.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for i in idx:
            n = tensors[i].numel()
            out[i] = flat[offset : offset + n].view(tensors[i].shape)
            offset += n
    return out  # type: ignore[return-value]
