"""Constant-state decoding for converted causal language models (Hugging Face ``generate``).

A converted model's Hedgehog sites need, per layer and sequence, only the state S = sum_j phi(k_j)^T v_j
([Hkv, F, D], fp32) and z = sum_j phi(k_j) ([Hkv, F], fp32), whatever the length: :class:`HedgehogCache` holds
them in place of a growing KV cache::

    hhfft.convert(model, example_inputs)                          # a causal LM: GPT-2, Llama, ...
    out = model.generate(ids, past_key_values=HedgehogCache(model), max_new_tokens=64, do_sample=False)

How it works. The cache is a ``transformers.Cache`` with one layer per decoder layer: a :class:`HedgehogLayer` for
each converted attention module (found by its ``layer_idx``), a plain ``DynamicLayer`` for layers kept softmax
(mixed models decode too; those layers' KV caches grow as usual). ``HedgehogLayer.update(k, v)`` returns, to the
model's code, the marker op ``hhfft::hedgehog_cache_kv`` whose outputs look like the keys and values of a KV cache
over the past + new tokens (the model's shapes and masks stay what it expects), and whose inputs are the new k, v
and the layer's (S, z). The converted model's forward runs through Dynamo with hhfft's passes (as every converted
forward does); the linearize pass finds the attention that reads the marker and replaces it by
``hhfft.lowering.decode.hedgehog_decode`` on the new tokens and the state: a prompt goes through the chunked causal
form on top of the state, a single token through the recurrent step (a Triton kernel on CUDA), and the state is
updated in place. The number of tokens seen is carried as the size of an empty tensor, so Dynamo compiles three graphs
in all, not one per length: the prompt's, the first step's, and at the second step one dynamic graph for every later
step (automatic dynamic shapes).

Refused with a message: a model with no converted site, converted attention modules without an integer
``layer_idx``, an owner with several converted sites, a non-causal site, a multi-token step after the first
without a provably causal mask, cropping (assisted decoding) — a state cannot forget tokens.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

try:  # transformers is optional: the cache is only defined where it is installed
    from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError("hhfft.convert.decode needs transformers (pip install transformers)") from e

import hhfft.lowering.decode  # noqa: F401  (registers hhfft::hedgehog_cache_kv)
from hhfft.convert.modules import hedgehog_sites, is_converted

__all__ = ["HedgehogCache", "HedgehogLayer", "decoding_layers"]


class HedgehogLayer(CacheLayerMixin):
    """The constant-size decoding state of one converted attention layer.

    Attributes (after the first ``update``): ``state`` [B, Hkv, F, D] and ``normalizer`` [B, Hkv, F], fp32 (fp64
    for an fp64 model); F is the k feature map's output size (2 x feature_dim for the doubling kinds).
    """

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, feature_size: int, num_heads: int, **kwargs: Any) -> None:
        super().__init__()
        self.feature_size, self.num_heads = int(feature_size), int(num_heads)
        self.state: Tensor | None = None
        self.normalizer: Tensor | None = None
        self._seen: Tensor | None = None  # empty [0, n]: n tokens folded into the state (a size, so symbolic)

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        B = key_states.shape[0]
        dt = torch.float64 if value_states.dtype == torch.float64 else torch.float32
        self.device = key_states.device
        self.state = torch.zeros(B, self.num_heads, self.feature_size, value_states.shape[-1], dtype=dt, device=self.device)
        self.normalizer = torch.zeros(B, self.num_heads, self.feature_size, dtype=dt, device=self.device)
        self._seen = key_states.new_empty(0, 0)
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[0] != self.state.shape[0]:
            raise ValueError(f"HedgehogCache: keys [B, Hkv, L, D] = {tuple(key_states.shape)} are for another batch "
                             f"size than the state {tuple(self.state.shape)} ([B, H, F, D]); start a new HedgehogCache "
                             "for a new batch")
        if self.num_heads % key_states.shape[1]:
            raise ValueError(f"HedgehogCache: keys [B, Hkv, L, D] = {tuple(key_states.shape)} have "
                             f"{key_states.shape[1]} heads, which do not divide the {self.num_heads} heads of the "
                             "layer's feature map; the model does not match its conversion: convert it again "
                             "(hhfft.convert)")
        past = self.get_seq_length()
        k_all, v_all = torch.ops.hhfft.hedgehog_cache_kv(key_states, value_states, self.state, self.normalizer, past)
        self._seen = self._seen.new_empty(0, past + key_states.shape[-2])
        return k_all, v_all

    def get_seq_length(self) -> int:
        return 0 if self._seen is None else self._seen.shape[1]

    def get_mask_sizes(self, query_length: int, *args: Any) -> tuple:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def state_bytes(self) -> int:
        """Bytes of decoding state this layer holds (all sequences)."""
        if self.state is None:
            return 0
        return self.state.numel() * self.state.element_size() + self.normalizer.numel() * self.normalizer.element_size()

    def reset(self) -> None:
        """Forget every token: the next update starts a new state, of any batch size (as HF's DynamicLayer)."""
        self.state = self.normalizer = self._seen = None
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self.state = self.state.index_select(0, beam_idx.to(self.state.device))
            self.normalizer = self.normalizer.index_select(0, beam_idx.to(self.state.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.state = self.state.repeat_interleave(repeats, dim=0)
            self.normalizer = self.normalizer.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: Tensor) -> None:
        if self.is_initialized:
            self.state, self.normalizer = self.state[indices, ...], self.normalizer[indices, ...]

    def crop(self, max_length: int) -> None:
        raise NotImplementedError(
            "HedgehogCache cannot be cropped: a linear-attention state holds the sum over all tokens seen and cannot "
            "forget some of them (assisted/speculative decoding needs a KV cache; use a DynamicCache there)")

    def offload(self) -> None:
        if self.is_initialized:
            self.state, self.normalizer = self.state.to("cpu", non_blocking=True), self.normalizer.to("cpu", non_blocking=True)

    def prefetch(self) -> None:
        if self.is_initialized and self.state.device != self.device:
            self.state = self.state.to(self.device, non_blocking=True)
            self.normalizer = self.normalizer.to(self.device, non_blocking=True)


def decoding_layers(model: nn.Module) -> list:
    """[(layer_idx, HedgehogAttention or None)] for every attention module of ``model`` that has a ``layer_idx``
    (None: the layer stays softmax and keeps a KV cache), in layer order. Raises when the model cannot decode with a
    constant-size state (see the module docstring)."""
    sites = hedgehog_sites(model)
    if not sites:
        raise ValueError("HedgehogCache: the model has no Hedgehog sites; convert it first with hhfft.convert(model, "
                         "example_inputs) (or hhfft.load_converted)")
    by_owner: dict = {}
    for path, _, _, hh in sites:
        by_owner.setdefault(path, []).append(hh)
    layers: dict = {}
    for path, hhs in by_owner.items():
        owner = model.get_submodule(path)
        idx = getattr(owner, "layer_idx", None)
        if isinstance(idx, bool) or not isinstance(idx, int):
            raise ValueError(f"HedgehogCache: the converted attention module {path!r} ({type(owner).__name__}) has no "
                             "integer `layer_idx`, so its cache layer is unknown; constant-state decoding supports "
                             "Hugging Face decoder attention modules (GPT-2, Llama, ...)")
        if len(hhs) != 1:
            raise ValueError(f"HedgehogCache: {path!r} has {len(hhs)} converted attention sites; decoding supports one "
                             "per attention module")
        if idx in layers:
            raise ValueError(f"HedgehogCache: two converted modules share layer_idx {idx}")
        layers[idx] = hhs[0]
    for path, m in model.named_modules():
        idx = getattr(m, "layer_idx", None)
        if isinstance(idx, int) and not isinstance(idx, bool) and idx not in layers and \
                type(m).__name__.endswith("Attention") and not is_converted(m):
            layers[idx] = None
    n = _num_layers(model, max(layers) + 1)
    return [(i, layers.get(i)) for i in range(n)]


def _num_layers(model: nn.Module, at_least: int) -> int:
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    n = getattr(cfg, "num_hidden_layers", None) if cfg is not None else None
    return max(at_least, n) if isinstance(n, int) else at_least


class HedgehogCache(Cache):
    """A ``transformers.Cache`` that holds a constant-size Hedgehog state per converted layer.

    Args:
        model: a model converted with :func:`hhfft.convert` (or restored with :func:`hhfft.load_converted`)

    Pass it to ``model.generate(..., past_key_values=HedgehogCache(model))`` or to the model's forward; use a new
    one per batch of prompts. Layers kept softmax by the conversion keep an ordinary KV cache.

    Example:
        >>> import transformers, hhfft
        >>> cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=50)
        >>> lm = transformers.GPT2LMHeadModel(cfg).eval()
        >>> _ = hhfft.convert(lm, {"input_ids": torch.randint(0, 50, (1, 8)), "use_cache": False})
        >>> cache = HedgehogCache(lm)
        >>> out = lm.generate(torch.randint(0, 50, (1, 5)), past_key_values=cache, max_new_tokens=4,
        ...                   do_sample=False, pad_token_id=0)
        >>> out.shape, cache.get_seq_length(), cache.state_bytes()
        (torch.Size([1, 9]), 8, 4608)
    """

    def __init__(self, model: nn.Module) -> None:
        layers = []
        for idx, hh in decoding_layers(model):
            if hh is not None and hh.window:
                raise ValueError(
                    f"HedgehogCache: the site of layer {idx} is a sliding-window hybrid (window {hh.window}); "
                    "decoding it needs the last window's keys and values besides the constant-size state, which "
                    "this cache does not keep. Generate without a cache (use_cache=False), or convert with window=0")
            if hh is not None and hh.sinks:
                raise ValueError(
                    f"HedgehogCache: the site of layer {idx} has {hh.sinks} softmax sink(s), whose keys and values "
                    "this cache does not keep besides the constant-size state. Generate without a cache "
                    "(use_cache=False), or convert with sinks=0")
            layers.append(DynamicLayer() if hh is None else HedgehogLayer(hh.k_map.out_features, hh.k_map.num_heads))
        super().__init__(layers=layers)

    def state_bytes(self) -> int:
        """Bytes of decoding state held now (all sequences; KV caches of layers kept softmax included)."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, HedgehogLayer):
                total += layer.state_bytes()
            elif getattr(layer, "keys", None) is not None:
                total += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
        return total
