"""The one exception type users see: its message names the problem and the fix."""


class LayerwiseError(Exception):
    """Bad input or an impossible request. The CLI prints the message alone and exits non-zero."""
