"""Chat: the terminal REPL over a conversation (``ifp chat``)."""
