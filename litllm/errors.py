"""The one exception type litllm raises for bad user input.

The CLI prints `error: <message>` (one line, no traceback) and exits with status 1.
"""


class LitLLMError(Exception):
    """User-facing error: the message names the file/field and what was expected."""
