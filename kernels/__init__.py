"""Jagged HSTU attention: one public op (`hstu_attention`) over interchangeable implementations."""

from kernels.hstu_attention import hstu_attention, hstu_cached_attention
from kernels.reference import valid_attn_mask

__all__ = ["hstu_attention", "hstu_cached_attention", "valid_attn_mask"]
