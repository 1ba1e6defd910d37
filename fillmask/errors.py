"""User-facing errors: each names the file, option or value at fault and the fix."""


class FillmaskError(ValueError):
    """A mistake in the user's input; the CLI prints it as one line, without a traceback."""
