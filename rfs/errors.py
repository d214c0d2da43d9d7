"""The one base of rfs's expected failures."""


class RfsError(Exception):
    """An expected failure (bad config, missing setup, dead cluster, a server that will not start):
    its message is one line naming the cause and what to do. `rfs` prints it without a traceback;
    any other exception is a bug and keeps its traceback."""
