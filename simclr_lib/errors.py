"""Errors a user can fix (the command line prints them as one line and exits with code 2), and the signal stop."""

import signal


class UserError(Exception):
    """A mistake in the user's input (flags, config, data, paths) with a message that says what to do."""


class DataNotFoundError(UserError):
    """The requested data set is not on disk and could not be downloaded."""


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the message hints at what to change. The last good checkpoint stays."""


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped training after a whole step; a checkpoint of that step was written."""

    def __init__(self, signum: int, epoch: int, step_in_epoch: int, steps_per_epoch: int, step: int,
                 run_dir: object) -> None:
        self.signum = int(signum)
        super().__init__(f"stopped by {signal.Signals(self.signum).name} after step {step} (epoch {epoch + 1}, step "
                         f"{step_in_epoch} of {steps_per_epoch}); checkpoint written: continue with "
                         f"`python run.py --resume --out {run_dir}`")

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process ended by that signal (130 SIGINT, 143 SIGTERM)."""
        return 128 + self.signum
