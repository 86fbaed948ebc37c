"""HunyuanVideo models with official parameter names. Nothing here imports torch.distributed."""

from hvbatch.models.attention import AttentionFn, sdpa_attention
from hvbatch.models.loading import load_transformer, random_transformer
from hvbatch.models.transformer import HunyuanVideoTransformer, TextLengths
from hvbatch.models.vae import AutoencoderKLCausal3D, DiagonalGaussian, VaeConfig
from hvbatch.models.vae_loading import load_vae
from hvbatch.models.vae_tiling import VaeTilingConfig, tiled_decode

__all__ = [
    "AttentionFn",
    "AutoencoderKLCausal3D",
    "DiagonalGaussian",
    "HunyuanVideoTransformer",
    "TextLengths",
    "VaeConfig",
    "VaeTilingConfig",
    "load_transformer",
    "load_vae",
    "random_transformer",
    "sdpa_attention",
    "tiled_decode",
]
