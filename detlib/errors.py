"""Errors shared by the trainer and the tools, importable without torch."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


class ToolError(ValueError):
    """Bad input to a tool (a run folder, a file, an option); the message names the file, the field and the value."""


_DEVICE_WORDS = ("CUDA", "cuDNN", "CUDNN", "CUBLAS", "cuBLAS", "NCCL", "device-side assert", "out of memory",
                 "HIP error", "illegal memory access")


def is_device_failure(e: BaseException) -> bool:
    """A failure of the accelerator (a CUDA error, out of memory), not of the user's input: it keeps its
    traceback wherever bad input is shown as one line. By name and message, so no torch import is needed."""
    return type(e).__name__ in ("OutOfMemoryError", "AcceleratorError") or (
        isinstance(e, RuntimeError) and any(w in str(e) for w in _DEVICE_WORDS))
