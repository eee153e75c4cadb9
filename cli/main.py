"""The ``ifp`` command line. Each command lives in its own module.

Every command's help ends with an example. Errors the user can fix
(IFPError) print as one line on stderr and exit with status 2.
"""

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


def main() -> None:
    try:
        app()
    except IFPError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
