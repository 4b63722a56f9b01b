"""The one base of every error a user can cause and fix: a setting, a file, a folder, a peer, a port.

Contract: `str(e)` is one line that names the culprit and, where it can, what to do. The applications
catch `UserError` once each (the CLI for every command, the TUI's engine) and show that line as it is:
no class name, no traceback, a non-zero exit. Anything else is a bug and keeps its traceback.

Subclasses also derive from the builtin they used to be (`ValueError`, `RuntimeError`, ...), so code
that caught those still does.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix; the message says what, in one line."""
