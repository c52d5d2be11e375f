"""The error every layer raises for bad input; the lowest layer of the package, importing none of it."""


class InputError(ValueError):
    """Bad input — spec, metadata, columns or an unusable output — named in the message; the job ends
    with ExitCode.BAD_INPUT, the CLI with the same code."""
