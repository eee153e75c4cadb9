"""Serve: a local OpenAI-compatible HTTP server (``ifp serve``)."""
