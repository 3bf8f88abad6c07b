"""The project's error type for bad input.

``InputError`` (a ``ValueError``) carries a one-line message that names the offending thing: the
flag, the file and the field, or the request parameter. Readers of user files (configs, prompt
files, checkpoints) raise it for any malformed content, so a command line can report it as one
line and a server as an HTTP 400.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input; the message is one line naming what is wrong and where."""
