"""Exception types whose messages are shown to musicians: each says what was wrong and where."""


class CMIError(Exception):
    """Base of every error the daemon and its commands report without a traceback."""


class MidiFileError(CMIError):
    """A MIDI file could not be read or written; the message names the file and the problem."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class TimeMapError(CMIError):
    """A tempo map or time-signature list is unusable (absurd tempo, negative or unordered times)."""


class RegionError(CMIError):
    """An infill request does not describe a usable region (empty range, unknown track, bad note)."""


class InfillCancelled(CMIError):
    """An infill stopped because its caller asked it to (the engine's cancel callback, the server's
    should_stop): raised by the engine, passed through by the backend, answered as `cancelled`."""
