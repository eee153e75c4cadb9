"""User-facing errors. The CLI prints their message as one line and exits 2."""


class IFPError(Exception):
    """Bad input or state that the user can fix; the message says how."""
