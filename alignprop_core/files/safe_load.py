"""What went wrong reading a weight or state file, in one clause, without torch's unsafe advice.

Every loader of the package reads with safetensors or ``torch.load(weights_only=True)``; when that
refuses a file, its message advises retrying with ``weights_only=False``, which is exactly what must
not be done with an untrusted file. These helpers keep the informative part for our own messages.
"""
from __future__ import annotations

import contextlib
import warnings


@contextlib.contextmanager
def quiet_pickle_protocol_warning():
    """Drop torch's "Detected pickle protocol" warning: it comes just before torch refuses a raw
    pickle, and the refusal's own message already says what is wrong with the file."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        yield


def load_error_reason(err: BaseException) -> str:
    """The informative part of a torch.load / safetensors error, as one short clause.

    torch's weights-only refusal is a paragraph that advises retrying with the unsafe loader; only
    the line saying what was refused is kept (e.g. "Trying to load unsupported GLOBAL posix.system").
    """
    marker = "WeightsUnpickler error:"
    lines = [line.split(marker)[-1].strip() for line in str(err).splitlines()]
    useful = [line for line in lines if line and "weights_only" not in line
              and not line.startswith(("Weights only load failed", "Check the documentation"))]
    if "TorchScript" in str(err):
        reason = "it is a TorchScript archive"
    elif useful:
        reason = useful[0].split(". ")[0].rstrip(".")
    elif isinstance(err, EOFError):
        reason = "the file ends before its data does"
    elif str(err).strip():
        reason = "it holds Python objects other than tensors"
    else:
        return type(err).__name__
    return f"{type(err).__name__}: {reason}"
