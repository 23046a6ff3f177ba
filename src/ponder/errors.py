"""Errors a user can fix. The command line prints them as one line, without a traceback."""


class UserError(Exception):
    """A mistake in the user's input (config, paths, data). The message names the culprit and the fix."""


class TrainingError(Exception):
    """Training cannot go on (e.g. too many NaN losses in a row). Checkpoints already written stay intact."""
