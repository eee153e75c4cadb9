"""Gather: the selected FFN channels of every layer, from the bank into a compact submodel."""
