"""Model: the ifp model folder (config, FFN bank, weights, tokenizer) and loading it into mlx-lm."""
