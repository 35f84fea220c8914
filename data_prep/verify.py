"""``python -m data_prep verify --config C`` (``cxr-prep --verify``): every shard of ``prep.out``
checked against its manifest entry, the shards shared among the ranks (alone or ``mpirun -np N``).

Per shard: sha256, every chunk read (HDF5's Fletcher-32 checksums), datasets, shapes, dtypes,
counts, config hash; with all shards on one rank also the split totals and label counts. Every
problem is listed in one line on rank 0; exit code 1 when there is any.
"""
from __future__ import annotations

import time

from data_prep.manifest import SPLITS, ManifestError, load_manifest, verify_manifest


def run(cfg, comm, log) -> dict:
    """This rank's share (shards ``rank::size``) verified; rank 0 gathers and raises one ManifestError."""
    t0 = time.perf_counter()
    m = load_manifest(cfg.prep.out)
    files = [sh["file"] for name in SPLITS for sh in m["splits"][name]["shards"]]
    mine = files[comm.rank::comm.size]
    try:
        res = verify_manifest(cfg.prep.out, files=mine if comm.size > 1 else None)
        res["problems"] = ""
    except ManifestError as e:
        res = {"shards": len(mine), "images": 0, "problems": str(e).split(": ", 1)[-1]}
    everything = comm.gather(res, root=0) if comm.size > 1 else [res]
    if comm.rank != 0:
        return res
    problems = [r["problems"] for r in everything if r["problems"]]
    if problems:
        raise ManifestError(f"{cfg.prep.out}: " + "; ".join(problems) +
                            "; rerun prep with --overwrite (prep.overwrite=true) to rewrite the shards")
    n = sum(r["shards"] for r in everything)
    log.info("verify: %d shards of %s intact (sha256, Fletcher-32, shapes, counts) in %.1f s on %d rank(s)",
             n, cfg.prep.out, time.perf_counter() - t0, comm.size)
    return {"shards": n, "ok": True}
