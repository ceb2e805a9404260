"""The GPT: one model file shared by every stage, plus its KV cache."""
from pipeline.model.gpt import GPT, GPTConfig
from pipeline.model.kv_cache import KVCache

__all__ = ["GPT", "GPTConfig", "KVCache"]
