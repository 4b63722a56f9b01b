"""One base for every error a user can cause and fix: shown as one line, never as a traceback."""


class UserError(Exception):
    """A bad setting, identity file, model folder, unreachable peer...: the message is meant for the user."""
