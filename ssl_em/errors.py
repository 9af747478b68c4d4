"""What a user did wrong, as opposed to what ssl_em got wrong.

Every mistake a user can make (a bad flag, a missing or corrupt file, a folder that is not
what it should be) raises a `UserError` (or an OSError from the file system) whose message
starts with the file or flag at fault. `ssl-em` turns these into one line on stderr and
exit code 2 (`report`); anything else is a bug and keeps its traceback.
`--debug` (or SSL_EM_DEBUG=1) shows the traceback of user errors too, for bug reports.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


class UserError(ValueError):
    """A mistake in the input: the message names the file or flag and says what is wrong."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input, not a bug. safetensors' own error is one when a
    weights file is truncated or not safetensors at all."""
    kinds: list[type[BaseException]] = [UserError, OSError, json.JSONDecodeError]
    try:
        from safetensors import SafetensorError

        kinds.append(SafetensorError)
    except ImportError:  # pragma: no cover - safetensors is a dependency
        pass
    return tuple(kinds)


def find_user_error(err: BaseException | None) -> BaseException | None:
    """The first user error in `err`'s chain of causes (LightningCLI and jsonargparse wrap the
    errors raised while they build the classes)."""
    kinds, seen = user_errors(), set()
    while err is not None and id(err) not in seen:
        if isinstance(err, kinds):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def one_line(err: BaseException) -> str:
    """The message of a user error on one line, naming the file for OSErrors."""
    if isinstance(err, OSError) and err.filename is not None and not str(err).startswith(str(err.filename)):
        text = f"{err.filename}: {err.strerror or type(err).__name__}"
    else:
        text = str(err).strip() or type(err).__name__
    if text.startswith("Caught ") and "Original Traceback" in text:
        # Re-raised from a DataLoader worker: the message is the worker's traceback, whose
        # last line is the error itself ("pkg.FooError: PATH: what went wrong").
        last = text.strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last and "Error" in last.split(": ", 1)[0] else last
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return "; ".join(lines) if len(lines) <= 3 else lines[0]


def read_json_object(path, what: str, error: type[UserError] = UserError) -> dict:
    """The JSON object in the file `path`; `error` naming the file and `what` it should hold
    when the text is not JSON or holds another JSON value (a list, a number)."""
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise error(f"{path}: not valid JSON ({err}); the {what} is damaged") from None
    if not isinstance(data, dict):
        raise error(f"{path}: holds a JSON {type(data).__name__}, not the {what} object")
    return data


def check_at_least(least: int, flags: dict, error: type[UserError] = UserError) -> None:
    """`error` naming the first flag whose value is below `least` (None: not given);
    flags: {"--batch-size": 0, ...}."""
    for flag, value in flags.items():
        if value is not None and value < least:
            raise error(f"{flag} {value}: must be >= {least}")


def check_writable_file(path, flag: str) -> None:
    """UserError naming `flag` when `path` cannot become a file: it is a folder, or its
    folder does not exist. Checked before the work, not after it."""
    from pathlib import Path

    p = Path(path)
    if p.is_dir():
        raise UserError(f"{flag} {p}: is a folder; give a file name")
    if not p.parent.is_dir():
        raise UserError(f"{flag} {p}: folder {p.parent} does not exist")


def debug_enabled() -> bool:
    return os.environ.get("SSL_EM_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def check_parent_folders(out, label: str) -> None:
    """UserError "`label`: PARENT is a file, not a folder" when the nearest existing parent
    of the output path `out` is a file (it could never be created)."""
    for parent in Path(out).parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{label}: {parent} is a file, not a folder")
            return


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (at most 200 characters), or its type's name.
    For wrapping a library's error whose own text does not name our file."""
    lines = str(err).strip().splitlines()
    return (lines[0] if lines else type(err).__name__)[:200]
