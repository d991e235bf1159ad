"""Modules over the ops."""
from mmts_fast.nn.attention import GQAttention
from mmts_fast.nn.decomp import SeriesDecomp
from mmts_fast.nn.fast_attention import apply_fast_attention, remove_fast_attention
from mmts_fast.nn.lora import LoRAMixtureLinear, apply_dlora, apply_lora, load_adapters, save_adapters
from mmts_fast.nn.moe import MoLERouter, MultiExpertHeads, head_dropout
from mmts_fast.nn.revin import RevIN

__all__ = ["GQAttention", "LoRAMixtureLinear", "MoLERouter", "apply_dlora", "apply_fast_attention", "apply_lora", "remove_fast_attention", "load_adapters",
           "save_adapters", "MultiExpertHeads", "RevIN", "SeriesDecomp", "head_dropout"]
