"""K-Token Merging (a baseline span encoder): ``encoder`` (fixed blocks of K tokens -> one embedding)
and ``training`` (its distillation)."""

from umim.ktoken.encoder import (
    FORMAT,
    K_CHOICES,
    KTokenConfig,
    KTokenEncoder,
    blocks_for_ratio,
    check_k,
    is_ktoken_dir,
    kblock_segments,
    max_tr,
)

__all__ = ["FORMAT", "K_CHOICES", "KTokenConfig", "KTokenEncoder", "blocks_for_ratio", "check_k", "is_ktoken_dir",
           "kblock_segments", "max_tr"]
