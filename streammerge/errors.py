"""The one exception type users see.

Anything that is the user's input's fault (a bad file, a wrong recipe, a changed store) raises a
StreammergeError whose message is a single line naming what and where. The CLI prints it
without a traceback and exits non-zero; anything else is a bug and keeps its traceback.
"""


class StreammergeError(Exception):
    """A user-facing error: one line saying what went wrong and where."""


class CheckpointError(StreammergeError):
    """A model checkpoint is missing, malformed or hostile."""


class RecipeError(StreammergeError):
    """The recipe YAML is invalid."""


class StoreError(StreammergeError):
    """The job store is missing, incompatible or in use."""
