"""Evaluate: what a selector and keep ratio cost, measured on held-out data."""
