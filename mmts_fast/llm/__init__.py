"""Frozen decoder-LLM backbones (Time-LlaMA, SPEC 1.5). D-LoRA itself lives in :mod:`mmts_fast.nn.lora`."""
from mmts_fast.llm.backbone import load_backbone, load_tokenizer, memory_report, weight_stats

__all__ = ["load_backbone", "load_tokenizer", "memory_report", "weight_stats"]
