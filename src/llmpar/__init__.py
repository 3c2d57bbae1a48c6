"""LLM-training parallelism study: data, model, strategies, metrics, report."""
