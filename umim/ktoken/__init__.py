"""K-Token Merging (a baseline span encoder): ``encoder`` (the K-block segmenter and the encoder that
turns each block of K tokens into one embedding), ``lora`` (its LoRA adapters) and ``training``
(its Lightning modules)."""

from umim.ktoken.encoder import (
    FORMAT,
    K_CHOICES,
    KBlockSegmenter,
    KTokenConfig,
    KTokenEncoder,
    blocks_for_ratio,
    check_k,
    is_ktoken_dir,
    kblock_segments,
    max_tr,
    prefix_blocks,
)

__all__ = ["FORMAT", "K_CHOICES", "KBlockSegmenter", "KTokenConfig", "KTokenEncoder", "blocks_for_ratio", "check_k",
           "is_ktoken_dir", "kblock_segments", "max_tr", "prefix_blocks"]
