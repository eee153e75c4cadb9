"""Select: which FFN channels of every layer a prompt keeps (predictor, activations, static, dense, random)."""
