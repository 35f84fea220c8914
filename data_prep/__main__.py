"""``python -m data_prep --config C [--set k=v ...] [--strict] [--overwrite]`` (console script ``cxr-prep``).

``python -m data_prep verify --config C`` (or ``cxr-prep --verify``) checks the shards of ``prep.out``
against the manifest instead (``data_prep.verify``), in parallel under ``mpirun -np N``.

Runs alone or under ``mpirun -np N``; see ``data_prep.prepare`` for the flow and
ARCHITECTURE.md for the shard and manifest formats.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from data_prep import verify
from data_prep.cli import command
from data_prep.config import add_config_args, config_from_args
from data_prep.log import env_size, get_logger
from data_prep.manifest import ManifestError
from data_prep.metadata import MetadataError
from data_prep.prepare import PrepError, get_comm, run


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cxr-prep", description="NIH ChestX-ray14 -> HDF5 shards + manifest.json "
                                 "(one process or mpirun -np N)")
    add_config_args(ap)
    ap.add_argument("--strict", action="store_true", help="any skipped image or CSV row is an error (prep.strict)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace output made with a different config instead of refusing (prep.overwrite)")
    ap.add_argument("--verify", action="store_true",
                    help="check the shards in prep.out against manifest.json (checksums, shapes, counts) and exit")
    return ap


@command("cxr-prep")  # config errors exit 2, PrepError/MetadataError 1: one line each
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["verify"]:
        argv = argv[1:] + ["--verify"]
    args = build_parser().parse_args(argv)
    log = get_logger()
    cfg = config_from_args(args)
    prep = cfg.prep
    if args.strict or args.overwrite:
        prep = dataclasses.replace(prep, strict=prep.strict or args.strict, overwrite=prep.overwrite or args.overwrite)
        cfg = dataclasses.replace(cfg, prep=prep)

    comm = None
    try:
        comm = get_comm()
        if args.verify:
            verify.run(cfg, comm, log)
            return 0
        run(cfg, comm)
        return 0
    except (PrepError, MetadataError, ManifestError) as e:
        if getattr(e, "echo", False):
            return 1  # this rank only relays rank 0's error, which rank 0 prints
        raise
    except Exception:  # noqa: BLE001 - a bug on one rank must not leave the others waiting
        log.exception("prep failed")
        if comm is not None and comm.size > 1 and env_size() > 1:
            comm.Abort(1)
        return 1


if __name__ == "__main__":
    sys.exit(main())
