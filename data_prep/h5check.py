"""HDF5 files from others are data: what an open file holds is checked before any dataset is read.

HDF5 can make a read of one file read others: a dataset may keep its values in external files
(``external=[(path, offset, size)]``: any file the reader may read), a virtual dataset maps other
files' datasets, and soft or external links point elsewhere (an external link names another file).
A dataset may also claim a shape far beyond its file (unwritten chunks read as the fill value), so
that reading it allocates terabytes. :func:`walk` visits every object of an open file (``h5py.File``)
without reading a dataset and refuses, with one line naming the file and the dataset:

* links other than hard links (soft, external, user-defined), groups nested deeper than
  :data:`MAX_DEPTH` or more than :data:`MAX_OBJECTS` objects;
* datasets stored otherwise than contiguous or chunked (virtual, compact), with external storage,
  with filters other than deflate, shuffle, Fletcher-32 and LZF (a filter plugin is code loaded
  from the file system), of a type other than numbers and variable-length strings;
* a dataset whose values would take more bytes than its file could hold: its own size without a
  compression filter, about 1,000 times that with one (deflate's limit).

Callers then check each dataset's shape and dtype against what they expect (the manifest's count,
the model's variable) before reading it: ``data_prep.manifest.check_shard``, ``distributed.safeload``.
"""
from __future__ import annotations

import math

MAX_DEPTH = 16
MAX_OBJECTS = 100_000
COMPRESSION_RATIO = 1100  # deflate cannot shrink data by more than about 1032:1


def _filters():
    from h5py import h5z

    return {h5z.FILTER_DEFLATE: "deflate", h5z.FILTER_SHUFFLE: "shuffle", h5z.FILTER_FLETCHER32: "fletcher32",
            32000: "lzf"}


def _link_kind(t) -> str:
    from h5py import h5l

    return {h5l.TYPE_SOFT: "a soft link", h5l.TYPE_EXTERNAL: "an external link (to another file)"}.get(
        t, "a user-defined link")


def logical_bytes(ds) -> int:
    """The bytes a dataset's values take in memory (variable-length strings: their references)."""
    return math.prod(int(n) for n in (ds.shape or ())) * int(ds.id.get_type().get_size())


def walk(h, path, error=ValueError, fix: str = "") -> dict:
    """``{"/name": h5py.Dataset}`` of every dataset in the open file ``h``, each checked as the module
    says; ``error(one line)`` naming ``path`` and the object otherwise. Nothing is read but metadata."""
    import h5py
    from h5py import h5d, h5l, h5o

    tail = f"; {fix}" if fix else ""
    size = int(h.id.get_filesize())
    allowed = _filters()
    found: dict = {}
    seen: set = set()
    count = 0

    def refuse(where, what):
        return error(f"{path}: {where} {what}; refused (HDF5 files are read as data only){tail}")

    def visit(group, prefix, depth):
        nonlocal count
        if depth > MAX_DEPTH:
            raise refuse(f"group {prefix or '/'}", f"nests deeper than {MAX_DEPTH} levels")
        for name in group:
            full = f"{prefix}/{name}"
            count += 1
            if count > MAX_OBJECTS:
                raise refuse("the file", f"holds more than {MAX_OBJECTS} objects")
            kind = group.id.links.get_info(name.encode()).type
            if kind != h5l.TYPE_HARD:
                raise refuse(f"{full}", f"is {_link_kind(kind)}")
            obj = group[name]
            try:
                addr = h5o.get_info(obj.id).addr
            except (AttributeError, ValueError, KeyError):
                addr = None
            if addr is not None:
                if addr in seen:
                    if isinstance(obj, h5py.Group):
                        raise refuse(f"group {full}", "is linked twice (a loop)")
                    continue
                seen.add(addr)
            if isinstance(obj, h5py.Group):
                visit(obj, full, depth + 1)
            elif isinstance(obj, h5py.Dataset):
                check_dataset(obj, full)
                found[full] = obj
            elif not isinstance(obj, h5py.Datatype):
                raise refuse(full, f"is an object of type {type(obj).__name__}")

    def check_dataset(ds, full):
        where = f"dataset {full}"
        if ds.is_virtual:
            raise refuse(where, "is a virtual dataset (it maps datasets of other files)")
        plist = ds.id.get_create_plist()
        layout = plist.get_layout()
        if plist.get_external_count() > 0:
            raise refuse(where, "keeps its values in external files (HDF5 external storage)")
        if layout not in (h5d.CONTIGUOUS, h5d.CHUNKED):
            names = {h5d.COMPACT: "compact", h5d.VIRTUAL: "virtual"}
            raise refuse(where, f"has the {names.get(layout, str(layout))} layout (only contiguous or chunked)")
        compressed = False
        for i in range(plist.get_nfilters()):
            code = plist.get_filter(i)[0]
            if code not in allowed:
                raise refuse(where, f"uses HDF5 filter {code} (only deflate, shuffle, fletcher32, lzf)")
            compressed |= allowed[code] in ("deflate", "lzf")
        dt = ds.dtype
        if not (dt.kind in "biuf" or h5py.check_string_dtype(dt) is not None):
            raise refuse(where, f"has type {dt} (only numbers and strings)")
        need = logical_bytes(ds)
        limit = max(size, 1) * (COMPRESSION_RATIO if compressed else 1)
        if need > limit:
            raise refuse(where, f"claims {need} bytes ({'x'.join(map(str, ds.shape))} of {dt}) in a file of "
                                f"{size} bytes")

    visit(h, "", 0)
    return found
