"""How every command ends on bad input: one sentence on stderr and an exit code, never a traceback.

Every console script and ``python -m`` entry point is wrapped by :func:`command`. The project's
own errors derive from :class:`UserError` and carry their exit code:

* :class:`UsageError` (2): a bad config key or value, a bad argument, a config file that is missing;
* :class:`UserError` (1): a runtime failure the user can fix (a missing input file, a bad manifest,
  a model file that is not a model, a launch that cannot work).

A missing or unreadable file (``FileNotFoundError``, ``PermissionError``, ...) is reported the same
way (exit code 1). Any other exception is a bug and keeps its traceback. ``--debug`` (every command
takes it) or ``CXR_DEBUG=1`` shows the traceback of every error; ``--debug`` also sets ``CXR_DEBUG=1``
for the processes a command starts (the launcher's ranks).

Under ``mpirun``/``horovodrun`` a usage error is the same on every rank, so only rank 0 prints it;
a runtime error may be one rank's own (a file missing on one node), so every rank prints its line,
prefixed with its rank.

Nothing here imports TensorFlow, Horovod or mpi4py.
"""
from __future__ import annotations

import functools
import os
import sys

from data_prep.log import env_rank, env_size

DEBUG_ENV = "CXR_DEBUG"
_FILE_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


class UserError(Exception):
    """A problem the user can fix; its message is one sentence naming the key or the file."""
    exit_code = 1


class UsageError(UserError):
    """A bad argument or config: exit code 2."""
    exit_code = 2


_DEFERRED: list[UserError] = []


def deferred(e: UserError) -> UserError:
    """``e``, remembered: raised where TensorFlow wraps it (a tf.data generator, a py_function) it
    reaches the command as a TensorFlow error with a traceback; :func:`command` reports the
    remembered one line instead."""
    _DEFERRED.append(e)
    return e


_SPACE = ("No space left on device", "Disk quota exceeded")
_OUTPUT: list[str] = []


def note_output(folder) -> None:
    """The folder this command writes into, named by a full-disk error that carries no file name."""
    _OUTPUT[:] = [str(folder)]


def space_error(e: BaseException) -> UserError | None:
    """A full disk or quota (ENOSPC, EDQUOT), wherever it was raised (Python, h5py, TensorFlow), as one line."""
    import errno

    seen = 0
    while e is not None and seen < 10:
        seen += 1
        if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(s in str(e) for s in _SPACE):
            where = getattr(e, "filename", None)
            what = "disk quota exceeded" if (getattr(e, "errno", None) == errno.EDQUOT or _SPACE[1] in str(e)) \
                else "no space left on device"
            detail = f" writing {where}" if where else (f" writing into {_OUTPUT[0]}" if _OUTPUT else "")
            err = UserError(f"{what}{detail}; free space there (or choose another folder) and rerun: "
                            f"nothing half-written is kept")
            return err
        e = e.__cause__ or e.__context__
    return None


def debug_enabled(argv=None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return os.environ.get(DEBUG_ENV, "") not in ("", "0") or "--debug" in argv


def quiet_tensorflow(environ=None, argv=None) -> None:
    """TensorFlow's C++ notices below errors off (``TF_CPP_MIN_LOG_LEVEL=2``) unless the user chose a
    level; with ``--debug``/``CXR_DEBUG`` warnings stay (``1``). Its INFO lines (oneDNN, CPU
    instructions) repeat what rank 0 logs in the project's words, and its warnings are the
    ``OP_REQUIRES failed`` echoes of an error the project already states in one line (a damaged shard,
    a peer's stop). Read by TensorFlow at import: call before it."""
    environ = os.environ if environ is None else environ
    environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1" if debug_enabled(argv) else "2")


def add_debug_arg(parser):
    if "--debug" in parser._option_string_actions:  # add_config_args already added it
        return parser
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of an error (also {DEBUG_ENV}=1)")
    return parser


def one_line(e: BaseException) -> str:
    """The error as one line: a file error names the file; newlines become '; '."""
    if isinstance(e, _FILE_ERRORS) and getattr(e, "filename", None):
        msg = f"{e.filename}: {e.strerror or type(e).__name__}"
    else:
        msg = str(e) or type(e).__name__
    return "; ".join(part.strip() for part in msg.splitlines() if part.strip())


def report(prog: str, e: BaseException) -> int:
    """Print ``prog: error: ...`` once (rank 0 for usage errors, every rank else); the exit code."""
    code = e.exit_code if isinstance(e, UserError) else 1
    size, rank = env_size(), env_rank()
    if isinstance(e, UsageError) and size > 1 and rank != 0:
        return code  # Horovod/MPI: every rank read the same config; rank 0 says it
    where = f" [rank {rank}]" if size > 1 else ""
    print(f"{prog}:{where} error: {one_line(e)}", file=sys.stderr, flush=True)
    return code


def command(prog: str):
    """Decorator for a command's ``main(argv=None) -> int``: the project's errors (and missing
    files) become one line on stderr and the exit code (see the module); ``--debug`` or
    ``CXR_DEBUG=1`` lets them raise with their traceback."""
    def wrap(main_fn):
        @functools.wraps(main_fn)
        def main(argv=None):
            debug = debug_enabled(argv)
            if debug:
                os.environ[DEBUG_ENV] = "1"  # the stages a launcher starts inherit it
                return main_fn(argv)
            try:
                return main_fn(argv)
            except (UserError, *_FILE_ERRORS) as e:
                return report(prog, space_error(e) or e)
            except Exception as e:  # noqa: BLE001 - a user error wrapped by TensorFlow, or a full disk
                known = space_error(e) or (_DEFERRED[0] if _DEFERRED else None)
                if known is None:
                    raise
                return report(prog, known)
        return main
    return wrap
