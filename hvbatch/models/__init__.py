"""HunyuanVideo models with official parameter names. Nothing here imports torch.distributed."""

from hvbatch.models.attention import AttentionFn, sdpa_attention
from hvbatch.models.loading import load_transformer, random_transformer
from hvbatch.models.transformer import HunyuanVideoTransformer

__all__ = [
    "AttentionFn",
    "HunyuanVideoTransformer",
    "load_transformer",
    "random_transformer",
    "sdpa_attention",
]
