"""Errors a user can fix: the command line prints them as one line and exits with code 2."""


class UserError(Exception):
    """A mistake in the user's input (flags, config, data, paths) with a message that says what to do."""


class DataNotFoundError(UserError):
    """The requested data set is not on disk and could not be downloaded."""
