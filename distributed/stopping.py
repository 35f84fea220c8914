"""Stop signals (``train.stop_signals``), without TensorFlow: ``python -m distributed.train``
installs the handlers before TensorFlow loads, so a signal during start-up is kept too and
training stops after its first step (:class:`distributed.run_control.StepControl` decides when)."""
from __future__ import annotations

import contextlib
import signal
import threading

from data_prep.config import ConfigError

_active: list = []  # the holder of the handlers installed now (nested stop_signals share it)


class Stopped(Exception):
    """Training stopped by a signal at a step all ranks agreed on, its checkpoint written. The
    process exits with ``exit_code`` = 128 + the signal's number (SIGTERM 143, SIGUSR1 138, SIGINT
    130): what a shell, Slurm and ``launch pipeline`` read as "ended by that signal", not as a
    finished run (the next stage must not start on a half-trained model)."""

    def __init__(self, signum: int, where: str):
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}")
        self.signum, self.exit_code = signum, 128 + signum


class Signals:
    """The first stop signal received by this process (0: none yet)."""
    got = 0


def parse_stop_signals(spec: str) -> list[int]:
    """``train.stop_signals``: comma-separated names (SIGTERM, SIGUSR1, SIGINT, ...); empty = none."""
    out = []
    for name in (n.strip().upper() for n in spec.split(",") if n.strip()):
        name = name if name.startswith("SIG") else "SIG" + name
        sig = getattr(signal, name, None)
        if not isinstance(sig, signal.Signals) or sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ConfigError(f"train.stop_signals: {name!r} is not a signal that can be caught "
                              f"(e.g. SIGTERM,SIGUSR1,SIGINT)")
        out.append(int(sig))
    return out


@contextlib.contextmanager
def stop_signals(spec: str):
    """While training: the signals of ``spec`` only set :class:`Signals`.got (the step loop decides
    when to stop); the previous handlers come back afterwards. Inside another ``stop_signals``: its
    holder (a signal received earlier is not forgotten)."""
    if _active:
        yield _active[-1]
        return
    holder, old = Signals(), {}

    def handler(signum, frame):
        if not holder.got:
            holder.got = signum

    if threading.current_thread() is threading.main_thread():  # Python sets handlers there only
        for sig in parse_stop_signals(spec):
            old[sig] = signal.signal(sig, handler)
    _active.append(holder)
    try:
        yield holder
    finally:
        _active.pop()
        for sig, h in old.items():
            signal.signal(sig, h)
