"""Metrics: definitions (pure functions), the per-step recorder, the background sampler, environment."""
