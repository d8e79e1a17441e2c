"""Errors shared by the trainer and the tools, importable without torch."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""
