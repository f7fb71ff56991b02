"""The hospital side: dataset registry, approval store, task queue, round executor, daemon, CLI."""
