"""User-facing errors: each names the file, option or value at fault and the fix."""


class FillmaskError(ValueError):
    """A mistake in the user's input; the CLI prints it as one line, without a traceback."""


PREEMPTED_EXIT_CODE = 75
"""Exit status of a run stopped by SIGTERM/SIGUSR1 after saving ``preempted.ckpt`` (EX_TEMPFAIL:
try again later, with ``--ckpt_path last``)."""
