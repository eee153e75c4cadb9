"""`ifp selftest`: check the gather paths of this machine bit for bit, and their speed."""

import typer

from .app import app


@app.command()
def selftest(
    layers: int = typer.Option(16, "--layers", help="bandwidth bank: layers"),
    d_ff: int = typer.Option(8192, "--d-ff", help="bandwidth bank: FFN width"),
    hidden: int = typer.Option(2048, "--hidden", help="bandwidth bank: hidden size"),
    bits: int = typer.Option(4, "--bits", help="bandwidth bank: affine bits (2, 3, 4, 5, 6, 8), or 16 for float16"),
    group_size: int = typer.Option(64, "--group-size", help="bandwidth bank: quantization group size"),
    keep: float = typer.Option(0.5, "--keep", help="bandwidth bank: share of the channels gathered"),
    rounds: int = typer.Option(5, "--rounds", help="timed gathers per path (median reported)"),
) -> None:
    """Check the gather kernels against the portable gather and measure their bandwidth.

    On a Mac with Metal: both Metal kernels against the portable gather (mx.take), bit
    for bit, on awkward shapes, every float dtype and every affine bit width and group
    size; then the GB/s of each path on a 1B-class bank. Elsewhere it says the portable
    gather is in use and why, and checks that one against a numpy reference. One line a
    case; exits 1 on any mismatch.

    Examples: ifp selftest
              ifp selftest --bits 16 --layers 8 --rounds 3
    """
    from ..gather.selftest import BandwidthBank, run_selftest

    spec = BandwidthBank(layers, d_ff, hidden, bits, group_size, keep)
    if not run_selftest(print, spec, rounds):
        raise typer.Exit(1)
