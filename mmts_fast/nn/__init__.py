"""Modules over the ops."""
from mmts_fast.nn.decomp import SeriesDecomp
from mmts_fast.nn.moe import MoLERouter, MultiExpertHeads, head_dropout
from mmts_fast.nn.revin import RevIN

__all__ = ["MoLERouter", "MultiExpertHeads", "RevIN", "SeriesDecomp", "head_dropout"]
