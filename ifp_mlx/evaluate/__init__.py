"""Evaluate: what a selector and keep ratio cost, on real tasks (HumanEval, math, MMLU, lm-eval) and held-out data."""
