"""Converted checkpoints: the feature maps in safetensors plus a JSON manifest. The original checkpoint files are
never written; every write goes to a temporary file in the target directory and is renamed into place."""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from typing import Any

import torch
from torch import nn

from hhfft.convert.modules import HedgehogAttention, HedgehogConfig, hedgehog_sites, install, install_root, uninstall

__all__ = ["save_converted", "load_converted", "MANIFEST", "WEIGHTS"]

MANIFEST = "hhfft_manifest.json"
WEIGHTS = "hedgehog.safetensors"
FORMAT = "hhfft-hedgehog/1"


def _version() -> str:
    try:
        import hhfft

        return getattr(hhfft, "__version__", "unknown")
    except Exception:  # noqa: BLE001
        return "unknown"


def _atomic_write(path: str, data: bytes) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file 0600: give it the mode open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _owner_ints(owner: nn.Module) -> dict:
    """The owner's own int attributes (head counts and sizes: ``num_heads``, ``head_dim``, ...): a model with other
    heads can have parameters of the same shapes."""
    return {k: v for k, v in vars(owner).items() if not k.startswith("_") and type(v) is int}


_SITE_NAME = re.compile(r"hedgehog(_\d+)?")  # modules.site_name(index)


def _owner_signature(owner: nn.Module) -> dict:
    """Names and shapes of the owner's own parameters and buffers (not the Hedgehog maps)."""
    return {k: list(v.shape) for k, v in owner.state_dict().items()
            if not any(_SITE_NAME.fullmatch(part) for part in k.split(".")[:-1])}  # its own maps, a child's too


def save_converted(model: nn.Module, directory: str) -> dict:
    """Write the Hedgehog feature maps of a converted model to ``directory``: ``hedgehog.safetensors`` (keys as in
    ``model.state_dict()``) and ``hhfft_manifest.json`` (hhfft version, config, sites with module paths and
    shapes). Other files in the directory (an original checkpoint) are never touched. Returns the manifest."""
    from safetensors.torch import save

    sites = hedgehog_sites(model)
    if not sites:
        raise ValueError("save_converted: the model has no Hedgehog sites; run hhfft.convert.convert first")
    os.makedirs(directory, exist_ok=True)
    tensors, entries = {}, []
    for path, index, name, hh in sites:
        owner = model.get_submodule(path)
        prefix = f"{path}.{name}." if path else f"{name}."
        shapes = {}
        for k, v in hh.state_dict().items():
            tensors[prefix + k] = v.detach().cpu().contiguous()
            shapes[prefix + k] = list(v.shape)
        base = type(owner)._hhfft_base
        entries.append({"module_path": path, "index": index, "name": name,
                        "owner_class": f"{base.__module__}.{base.__qualname__}", **hh.describe(),
                        "tensors": shapes, "owner_state": _owner_signature(owner), "owner_ints": _owner_ints(owner)})
    blob = save(tensors)
    config = getattr(model, "_hhfft_config", None)
    manifest = {"format": FORMAT, "hhfft_version": _version(), "torch_version": torch.__version__,
                "config": config.to_dict() if isinstance(config, HedgehogConfig) else None,
                "weights": WEIGHTS, "weights_sha256": hashlib.sha256(blob).hexdigest(), "sites": entries}
    _atomic_write(os.path.join(directory, WEIGHTS), blob)
    _atomic_write(os.path.join(directory, MANIFEST), (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


def _mismatch(site: dict, what: str) -> ValueError:
    return ValueError(f"load_converted: the model does not match the converted checkpoint at site "
                      f"{site['module_path']!r} (#{site['index']}): {what}")


def load_converted(model: nn.Module, directory: str) -> list:
    """Re-install the feature maps saved by :func:`save_converted` into ``model`` (a fresh, unconverted copy of the
    model they were made for, or a converted one: its maps are replaced). Refuses a model that does not match,
    naming the first mismatching site. Returns the installed sites [(owner path, index)]."""
    from safetensors.torch import load

    mpath = os.path.join(directory, MANIFEST)
    if not os.path.exists(mpath):
        raise FileNotFoundError(f"load_converted: no {MANIFEST} in {directory!r}; write one with save_converted")
    with open(mpath) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"load_converted: {mpath} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    with open(os.path.join(directory, manifest["weights"]), "rb") as f:
        blob = f.read()
    if hashlib.sha256(blob).hexdigest() != manifest["weights_sha256"]:
        raise ValueError(f"load_converted: {manifest['weights']} in {directory!r} does not match its manifest "
                         "(sha256 differs): the checkpoint was modified or partly written")
    tensors = load(blob)
    plan = []
    for site in manifest["sites"]:
        try:
            owner = model.get_submodule(site["module_path"])
        except AttributeError:
            raise _mismatch(site, "no such module in the model") from None
        base = getattr(type(owner), "_hhfft_base", type(owner))
        cls = f"{base.__module__}.{base.__qualname__}"
        if cls != site["owner_class"]:
            raise _mismatch(site, f"the module is a {cls}, the checkpoint was made for a {site['owner_class']}")
        sig = _owner_signature(owner)
        for k, shape in site["owner_state"].items():
            if k not in sig:
                raise _mismatch(site, f"the module has no {k!r}")
            if sig[k] != shape:
                raise _mismatch(site, f"{k!r} has shape {sig[k]} in the model, {shape} in the checkpoint")
        ints = _owner_ints(owner)
        for k, v in site.get("owner_ints", {}).items():  # checkpoints written before they were recorded: skipped
            if k in ints and ints[k] != v:
                raise _mismatch(site, f"the module's {k} is {ints[k]}, the checkpoint's {v}")
        for k in site["tensors"]:
            if k not in tensors or list(tensors[k].shape) != site["tensors"][k]:
                raise ValueError(f"load_converted: {manifest['weights']} lacks {k!r} or has the wrong shape")
        plan.append((owner, site))
    built = []  # every map built and loaded before the model is touched: a failure leaves it as it was
    for owner, site in plan:
        like = next((p for p in owner.parameters() if p.is_floating_point()), None)
        hh = HedgehogAttention(site["heads"], site["kv_heads"], site["head_dim"], site["kind"], site["feature_dim"],
                               site["bias"], site.get("window", 0), site.get("sinks", 0),
                               **({} if like is None else {"device": like.device, "dtype": like.dtype}))
        prefix = f"{site['module_path']}.{site['name']}." if site["module_path"] else f"{site['name']}."
        hh.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True)
        if like is not None:
            hh.to(like.dtype)
        built.append((owner, site, hh))
    uninstall(model)
    out = []
    for owner, site, hh in built:
        install(owner, site["index"], hh)
        out.append((site["module_path"], site["index"]))
    if manifest.get("config"):
        model._hhfft_config = HedgehogConfig.from_dict(manifest["config"])
    install_root(model)
    return out


def _describe(manifest: Any) -> str:  # for the CLI
    return "\n".join(f"  {s['module_path']}#{s['index']}: {s['kind']} heads {s['heads']}/{s['kv_heads']} "
                     f"dim {s['head_dim']} -> {s['feature_dim']}" for s in manifest["sites"])
