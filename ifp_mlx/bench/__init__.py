"""Bench: `ifp bench`'s tests of speed and memory (suite, report), the ratio tools (ratios), random models of real shapes (shapes)."""
