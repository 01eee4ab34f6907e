"""One exception type for every problem a user can cause: the CLI prints it as one line and exits 2."""


class UserError(ValueError):
    """Bad input (config, spec, checkpoint, corpus, path): the message names the problem in one line."""
