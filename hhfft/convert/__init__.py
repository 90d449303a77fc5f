"""Convert softmax attention in existing models to Hedgehog linear attention, distill the feature maps, save and
reload them. HF integration (``hhfft.convert.hf``) and the CLI (``hhfft.convert.cli``) are imported lazily."""
from hhfft.convert.checkpoint import load_converted, save_converted
from hhfft.convert.core import convert
from hhfft.convert.distill import DistillResult, distill, site_losses
from hhfft.convert.modules import HedgehogAttention, HedgehogConfig, hedgehog_sites, is_converted, uninstall

__all__ = ["DistillResult", "HedgehogAttention", "HedgehogConfig", "convert", "distill", "hedgehog_sites",
           "is_converted", "load_converted", "save_converted", "site_losses", "uninstall"]
