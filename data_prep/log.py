"""A logger that is silent off rank 0, so call sites never test the rank (big_vision style).

``get_logger()`` reads the rank from the launcher's environment (Open MPI, Horovod/Gloo,
Slurm, PMI), so it works before MPI or Horovod is initialised and without either.
``get_logger(all_ranks=True)`` is for the few lines every rank must say (its thread settings).
"""
from __future__ import annotations

import logging
import os
import sys

_RANK_VARS = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID")
_LOCAL_RANK_VARS = ("HOROVOD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID")
_SIZE_VARS = ("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS")
_LOCAL_SIZE_VARS = ("HOROVOD_LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE")


def _env_int(names, default: int) -> int:
    for n in names:
        v = os.environ.get(n)
        if v:
            try:
                return int(v.split("(")[0].split(",")[0])
            except ValueError:
                continue
    return default


def env_rank() -> int:
    return _env_int(_RANK_VARS, 0)


def env_local_rank() -> int:
    return _env_int(_LOCAL_RANK_VARS, 0)


def env_size() -> int:
    return _env_int(_SIZE_VARS, 1)


def env_local_size() -> int:
    return _env_int(_LOCAL_SIZE_VARS, 1)


class _RankFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record):
        record.rank = self.rank
        return True


def get_logger(name: str = "cxr", rank: int | None = None, all_ranks: bool = False,
               logfile: str | None = None) -> logging.Logger:
    """Rank 0 logs at INFO; other ranks only WARNING and above, unless ``all_ranks``."""
    rank = env_rank() if rank is None else rank
    logger = logging.getLogger(f"{name}.all" if all_ranks else name)
    if not getattr(logger, "_cxr_configured", False):
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(asctime)s [rank %(rank)s] %(levelname)s %(message)s" if all_ranks or env_size() > 1 \
            else "%(asctime)s %(levelname)s %(message)s"
        handler.setFormatter(logging.Formatter(fmt, "%H:%M:%S"))
        logger.addHandler(handler)
        logger.addFilter(_RankFilter(rank))
        logger.propagate = False
        logger._cxr_configured = True
    logger.setLevel(logging.INFO if (rank == 0 or all_ranks) else logging.WARNING)
    if logfile and rank == 0 and not any(isinstance(h, logging.FileHandler) for h in logger.handlers):
        os.makedirs(os.path.dirname(os.path.abspath(logfile)), exist_ok=True)
        fh = logging.FileHandler(logfile)
        fh.setFormatter(logging.Formatter("%(asctime)s [rank %(rank)s] %(levelname)s %(message)s"))
        logger.addHandler(fh)
    return logger


def follow_rank(rank: int, name: str = "cxr", logfile: str | None = None) -> logging.Logger:
    """After an elastic restart gave this process another rank: the label, the level (INFO on rank 0)
    and the log file (rank 0 only) follow the new rank."""
    logger = get_logger(name, rank=rank, logfile=logfile)
    for f in logger.filters:
        if isinstance(f, _RankFilter):
            f.rank = rank
    if rank != 0:
        for h in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
            logger.removeHandler(h)
            h.close()
    return logger
