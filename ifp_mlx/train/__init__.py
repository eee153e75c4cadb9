"""Train: the sparsity predictor (and adapters) through the masked model, in MLX."""
