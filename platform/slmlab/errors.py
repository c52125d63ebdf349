"""Errors the platform raises on purpose, and how the CLI recognises them.

An error of these types means "the input cannot work" (a config field, a data source, a model
reference, an export target), never "slmlab has a bug": its message already names the file, the
field, what was expected and what was found, one line per problem. The CLI prints that message
alone and exits 2; ``slmlab --verbose`` shows the traceback instead.
"""
from __future__ import annotations

import re


class SlmlabError(Exception):
    """Base of every deliberate, user-facing error."""


class DataError(SlmlabError, ValueError):
    """A data source that cannot become shards (missing, empty, unreadable, wrong fields)."""


class RegistryError(SlmlabError, LookupError):
    """A model reference (models:/..., runs:/..., a folder) that resolves to nothing loadable."""


class ExportError(SlmlabError, ValueError):
    """An export that would overwrite what it did not write, or cannot represent the model."""


# Messages of the data code name the config field first ("data.sources[0] (...): expected ...",
# "data: expected documents on both sides ..."); a ValueError/OSError that reads like that is a
# deliberate data error even when raised as a builtin type (data/* predates DataError).
_DATA_MESSAGE = re.compile(r"^(finetune\.)?data(\.|:|\[)")


def _unwrap(err: BaseException) -> BaseException:
    """The original exception behind Ray's wrappers: a task or actor failure arrives as
    RayTaskError (``.cause``), Ray Data re-raises UDF errors as UserCodeException from the original."""
    seen: set[int] = set()
    while id(err) not in seen:
        seen.add(id(err))
        cause = getattr(err, "cause", None)  # ray.exceptions.RayTaskError
        if isinstance(cause, BaseException):
            err = cause
            continue
        if type(err).__name__ == "UserCodeException" and err.__cause__ is not None:
            err = err.__cause__
            continue
        break
    return err


def user_error(err: BaseException) -> SlmlabError | None:
    """``err`` (or what Ray wrapped) as a deliberate user-facing error, or None for a genuine bug.

    Recognised: any SlmlabError (ConfigError included), and ValueError/OSError whose message
    starts with a data field path, as the data code writes them."""
    # unwrapped first: Ray's wrapper is an instance of the cause's class too, but prints a traceback
    original = _unwrap(err)
    if isinstance(original, SlmlabError):
        return original
    if isinstance(original, (ValueError, OSError)) and _DATA_MESSAGE.match(str(original)):
        return DataError(str(original))
    return None
