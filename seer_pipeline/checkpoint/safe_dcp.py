"""DCP storage without code execution on read, and with per-file hashes on write.

torch.distributed.checkpoint unpickles twice when loading: `.metadata` with `pickle.load`, and
every non-tensor value with `torch.load` and weights_only off (torch 2.13, default_planner.py).
`SafeFileSystemReader` reads `.metadata` through the restricted unpickler (only DCP's metadata
classes, torch dtypes/Size/layout/memory-format, and pathlib paths), and `SafeLoadPlanner` loads
values with `weights_only=True`. Our per-rank payload (RNG, loader and queue state) is packed so
that `weights_only=True` reads it: numpy arrays become tensors and back.
"""
from __future__ import annotations

import dataclasses
import io
import os
import pickle
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem
from torch.futures import Future

from seer_pipeline.checkpoint import integrity
from seer_pipeline.core import safe_pickle

_DCP_MD = "torch.distributed.checkpoint.metadata"
# Every global a DCP .metadata pickle of torch 2.13 names (found by tracing find_class over
# saves of plain, bf16, sharded and optimizer state); anything else is refused.
DCP_METADATA_ALLOWED: dict[str, tuple[str, ...]] = {
    _DCP_MD: ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "TensorProperties",
              "ChunkStorageMetadata", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"),
    "torch.distributed.checkpoint.filesystem": ("_StorageInfo",),
    "torch.serialization": ("_get_layout",),  # maps "torch.strided" etc. to the layout object
    "torch": ("Size",),
    "pathlib": ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"),
}


def _weights_only_load(buf: io.BytesIO, what: str) -> Any:
    """torch.load(weights_only=True) with torch's long advice cut to the refused global."""
    try:
        return torch.load(buf, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = [ln.strip() for ln in str(e).splitlines() if "Unsupported" in ln or "GLOBAL" in ln]
        raise safe_pickle.UnsafePickleError(
            f"{what}: refused by weights_only loading ({(why or [str(e)])[0][:300]}); a crafted "
            "or foreign file - nothing was executed") from None


def _torch_dtype(module: str, name: str, obj: Any) -> bool:
    return module == "torch" and isinstance(obj, torch.dtype)


def load_dcp_metadata(f: Any) -> Metadata:
    """Unpickle a DCP `.metadata` stream with only the classes that format uses."""
    md = safe_pickle.restricted_load(f, DCP_METADATA_ALLOWED, _torch_dtype, what="DCP .metadata")
    if not isinstance(md, Metadata):
        raise safe_pickle.UnsafePickleError(f"DCP .metadata holds a {type(md).__name__}, not Metadata")
    return md


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose `.metadata` goes through the restricted unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = load_dcp_metadata(f)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner whose non-tensor values are read with `weights_only=True`."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        obj = _weights_only_load(value, f"DCP value {read_item.dest_index.fqn!r}")
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


@dataclasses.dataclass(frozen=True)
class _Recorded:
    """A write result's storage info plus its file's (size, sha256), as the writing rank saw it:
    it reaches the coordinator inside DCP's own gather of write results (no extra collective)."""

    info: Any
    file: tuple[int, str]


class HashingFileSystemWriter(FileSystemWriter):
    """FileSystemWriter whose ranks each hash and size the files they wrote, in the writing
    thread (an async save hashes in the background), after DCP fsynced them (`sync_files`), so
    every rank makes its own files durable before DCP's final collective. The coordinator's
    `finish` collects the records into `files` ({name: (size, sha256)}, `.metadata` included):
    rank 0's commit then needs no per-rank file access at all (issue #20)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.files: dict[str, tuple[int, str]] = {}

    def write_data(self, plan: Any, planner: Any) -> Future:
        results = super().write_data(plan, planner).wait()  # the file system writer is synchronous
        files = {}
        for name in {r.storage_data.relative_path for r in results}:
            path = os.path.join(self.path, name)
            files[name] = (os.path.getsize(path), integrity.hash_file(path))
        out: Future = Future()
        out.set_result([dataclasses.replace(r, storage_data=_Recorded(
            r.storage_data, files[r.storage_data.relative_path])) for r in results])
        return out

    def finish(self, metadata: Any, results: list[list[Any]]) -> None:
        plain = []
        for rank_results in results:
            row = []
            for r in rank_results:
                if isinstance(r.storage_data, _Recorded):
                    self.files[r.storage_data.info.relative_path] = r.storage_data.file
                    r = dataclasses.replace(r, storage_data=r.storage_data.info)
                row.append(r)
            plain.append(row)
        super().finish(metadata, plain)
        md = os.path.join(self.path, ".metadata")
        self.files[".metadata"] = (os.path.getsize(md), integrity.hash_file(md))


def load(state: dict[str, Any], path: str | os.PathLike, no_dist: bool) -> None:
    """`dcp.load` that never unpickles arbitrary objects."""
    dcp.load(state, storage_reader=SafeFileSystemReader(path), planner=SafeLoadPlanner(),
             no_dist=no_dist)


# -- the per-rank payload ------------------------------------------------------------------------
_ND = "__ndarray__"


def _encode(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return {_ND: torch.from_numpy(obj.astype(np.int64) if obj.dtype.kind == "u" else obj.copy()),
                "dtype": obj.dtype.str}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: _encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_encode(v) for v in obj)
    return obj


def _decode(obj: Any) -> Any:
    if isinstance(obj, dict):
        if _ND in obj and set(obj) == {_ND, "dtype"}:
            return obj[_ND].numpy().astype(np.dtype(obj["dtype"]))
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_decode(v) for v in obj)
    return obj


def pack(obj: Any) -> bytes:
    """Per-rank state as bytes that `weights_only=True` can read (tensors, containers, scalars)."""
    buf = io.BytesIO()
    torch.save(_encode(obj), buf)
    return buf.getvalue()


def unpack(blob: Any) -> Any:
    if isinstance(blob, (bytes, bytearray)):
        return _decode(_weights_only_load(io.BytesIO(blob), "per-rank payload"))
    return _decode(blob)  # DCP may hand back the object itself
