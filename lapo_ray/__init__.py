"""LAPO latent action policies on Ray (docs/architecture.md is the map of the code).

The errors for bad input live here, in the package itself, below every room: config's checks
raise them, storage and runtime (the same layer, which may not import config) raise and catch
them, and every room above does too.
"""

__version__ = "0.1.0"


class UsageError(ValueError):
    """Bad input from whoever started the job, not a bug: a flag value, a path, a corpus,
    checkpoint or folder they named, a config that does not fit the folder it meets, a CPU or
    GPU budget the flags ask for. A job ends on it with one line naming the input and exit status
    2 (``runtime.run_job``); any other exception is a bug and keeps its traceback. A ValueError,
    so that callers which catch ValueError still catch it."""


class MissingPathError(UsageError, FileNotFoundError):
    """A path the user named (or a file their folder should hold) is not there. Also a
    FileNotFoundError, for callers that catch that."""


# The Python API of a trained run, resolved on first use: ``import lapo_ray`` stays cheap (config
# and storage import it) and imports neither PyTorch nor Ray. ``importlib`` rather than an import
# statement, because the name is looked up only after this package has finished importing, so the
# train room's own ``from lapo_ray import UsageError`` is no import cycle with it.
_LAZY = {"load_run": "lapo_ray.train.run", "export_run": "lapo_ray.train.run", "Run": "lapo_ray.train.run"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lapo_ray' has no attribute {name!r}")
