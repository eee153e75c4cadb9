"""The one exception type the converter raises for bad input.

The CLI prints its message as a single line; anything else is a bug.
"""

from ..errors import IFPError


class ConversionError(IFPError):
    """Bad or unsupported input: the message names the problem in one line."""
