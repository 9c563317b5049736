"""The one exception type users see: its message names the problem and the fix."""

from __future__ import annotations

import errno
import os
import re

# errno -> what to tell the user about a failed write; other errors are not about the output's filesystem.
WRITE_ERRNOS = {
    errno.ENOSPC: "the filesystem is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "a file exceeds the filesystem's or the process's (ulimit -f) file size limit",
    errno.EROFS: "the filesystem is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}


class LayerwiseError(Exception):
    """Bad input or an impossible request. The CLI prints the message alone and exits non-zero.

    `details` are lines too long for that one message (every module a refusal concerns, say); the CLI prints
    them under it with ``--verbose``.
    """

    def __init__(self, message: str, *, details: list[str] | None = None) -> None:
        super().__init__(message)
        self.details = list(details or [])


def write_error(target: os.PathLike | str, exc: BaseException) -> LayerwiseError | None:
    """The LayerwiseError for a write to `target` that failed for lack of space or permission, else None.

    For writers that have already removed their partial output (`atomic_dir`, `write_json_atomic`).
    safetensors reports I/O errors as its own SafetensorError, with the OS error number in the text.
    """
    code = exc.errno if isinstance(exc, OSError) else None
    if type(exc).__name__ == "SafetensorError":
        found = re.search(r"os error (\d+)", str(exc))
        code = int(found.group(1)) if found else None
    if code not in WRITE_ERRNOS:
        return None
    return LayerwiseError(
        f"cannot write {target}: {WRITE_ERRNOS[code]} ({os.strerror(code)}); nothing was written under {target} "
        "and the partial output was removed; free space or choose another output path, then run again"
    )
