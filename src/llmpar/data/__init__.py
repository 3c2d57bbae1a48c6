"""Data components: corpus -> tokenizer -> packed token shards -> deterministic batches."""
