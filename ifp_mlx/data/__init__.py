"""Data: the jsonl record format, and builders that read packaged datasets into it."""
