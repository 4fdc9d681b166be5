def first_line(e: BaseException, limit: int = 200, default: str = "") -> str:
    """The first line of an exception's message, cut to ``limit`` characters (``default`` when it has none)."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else default


class BzqError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""

    exit_code = 1


class BzqInterrupted(BzqError):
    """Ctrl-C: the message says what was kept and how to resume."""

    exit_code = 130


class BzqPartial(BzqError):
    """The result was written, but an optional step (ONNX export, evaluation) failed; results.json says which."""

    exit_code = 3
