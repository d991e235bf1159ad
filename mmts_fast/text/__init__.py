"""Text for the LLM-enhanced models: frozen encoders, an on-disk embedding cache and prompts.

Importing this package imports neither transformers nor the model packages; models load lazily.
"""
from mmts_fast.text.cache import EmbeddingCache, default_cache_dir
from mmts_fast.text.encoders import TextEncoder, last_token_pool, mean_pool, pad_tokens
from mmts_fast.text.prompts import DATASET_DESCRIPTIONS, dynamic_prompts, freq_step, static_prompt

__all__ = [
    "DATASET_DESCRIPTIONS",
    "EmbeddingCache",
    "TextEncoder",
    "default_cache_dir",
    "dynamic_prompts",
    "freq_step",
    "last_token_pool",
    "mean_pool",
    "pad_tokens",
    "static_prompt",
]
