"""Bench: speed and memory figures, measured as ratios inside one run."""
