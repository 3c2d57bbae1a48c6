"""Data components: corpus -> tokenizer -> packed token shards -> deterministic batches."""

from llmpar.data.describe import describe

__all__ = ["describe"]
