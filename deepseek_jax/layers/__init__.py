"""Flax linen layers: RMSNorm, RoPE/YaRN, MLA, DeepSeekMoE, MTP, and the one Dense."""
