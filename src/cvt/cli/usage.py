"""`UsageError`: the arguments given cannot work together, found after parsing (exit code 2, as argparse's own)."""


class UsageError(ValueError):
    """A combination of command-line arguments that cannot work; `cvt` prints it in one line and exits 2."""
