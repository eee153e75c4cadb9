"""The ``ifp`` command line. Each command lives in its own module.

Every command's help ends with an example. Errors the user can fix
(IFPError) print as one line on stderr and exit with status 2.
"""

import os
import sys

from ..errors import IFPError
from . import (  # noqa: F401  (each import registers its commands)
    bench,
    calibrate,
    chat,
    convert,
    data,
    evaluate,
    generate,
    masks,
    models,
    predictor,
    selftest,
    serve,
    train,
)
from .app import app, err

STREAMS = (("stdin", "r"), ("stdout", "w"), ("stderr", "w"))


def main() -> None:
    open_standard_streams()
    try:
        app()
    except IFPError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


def open_standard_streams() -> None:
    """Open /dev/null onto any of descriptors 0, 1, 2 that the caller closed (``ifp generate Hi <&-``).

    Otherwise the next file opened takes the closed number: MLX refuses a
    weights file that opens as descriptor 0, and a model file on descriptor
    1 or 2 would receive the output. Python leaves ``sys.stdin`` (etc.) None
    for a descriptor closed at startup; they get the /dev/null one.
    """
    for fd, (name, mode) in enumerate(STREAMS):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, mode, encoding="utf-8", errors="surrogateescape", closefd=False))


if __name__ == "__main__":
    main()
