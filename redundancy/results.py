"""Result rows and per-sample records on disk: one file per evaluated point, written atomically.

    from redundancy.results import load_results, load_samples
    df = load_results("results/sweep")        # one row per point, config flattened into columns
    per_sample = load_samples("results/sweep")  # one row per (point, question); join on `key`

Layout of a store (``<root>``, e.g. ``results/sweep``)::

    points/<key>.json       the result row of a finished point (its presence means "done")
    samples/<key>.jsonl     that point's per-sample records
    partial/<key>.jsonl     per-sample records of a point still in flight, appended per batch
    partial/<key>.<tag>.jsonl  the same, from one process of a data-parallel run (redundancy.distributed)

``key`` is :func:`point_key` of the point's identity (model checkpoint, data, evaluation
settings and the drop schedule's record), so every process that evaluates the same point
on the same model writes the same file: rows from several processes (Hydra multirun,
cluster array jobs, data-parallel workers) merge by copying files into one directory, and
a duplicate computation replaces a file with an equal one instead of adding a row. Files
are written to a temporary name and renamed (atomic on POSIX), samples before the row, so
a crash leaves either a finished point or none; a crash in flight loses at most the batch
being answered (the partial file is read back on the next run).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pandas loads when results are first read into a frame, not at import
    import pandas as pd

UNFLATTENED = ("spatial",)  # row fields kept as one column of dicts (None in rows without them)
_WHOLE_FILE_LIMIT = 64 * 2**20  # files up to this size are hashed whole; larger ones by head, tail and size
_EDGE = 2**20


# ------------------------------------------------------------------ identity
def point_key(identity: Mapping[str, Any]) -> str:
    """16 hex digits of the SHA-256 of ``identity`` as canonical JSON (sorted keys)."""
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def fingerprint(paths: Iterable[str | Path]) -> str:
    """16 hex digits identifying the content of ``paths`` (files; names relative to their
    directory, so the same files anywhere give the same fingerprint). Files up to 64 MiB
    are hashed whole; larger ones (7B weights) by size, first and last MiB."""
    h = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        size = path.stat().st_size
        h.update(f"{path.name}\0{size}\0".encode())
        with path.open("rb") as f:
            if size <= _WHOLE_FILE_LIMIT:
                for block in iter(lambda: f.read(2**20), b""):
                    h.update(block)
            else:
                h.update(f.read(_EDGE))
                f.seek(size - _EDGE)
                h.update(f.read(_EDGE))
    return h.hexdigest()[:16]


def checkpoint_fingerprint(model_dir: str | Path) -> str:
    """:func:`fingerprint` of a HF model directory's config and weight files."""
    root = Path(model_dir)
    files = [
        p for p in root.iterdir() if p.is_file() and (p.name == "config.json" or p.suffix in (".safetensors", ".bin"))
    ]
    if not files:
        raise ValueError(f"{root} holds no config.json or weight files")
    return fingerprint(files)


# ------------------------------------------------------------------ the store
def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSONL file; a line cut short by a crash (the last one) is skipped."""
    out = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


class ResultStore:
    """The files of one results directory (see the module docstring)."""

    def __init__(self, root: str | Path, tag: str | None = None) -> None:
        self.root = Path(root)
        self.tag = tag  # this process's partial files are partial/<key>.<tag>.jsonl (data-parallel runs)

    def _row(self, key: str) -> Path:
        return self.root / "points" / f"{key}.json"

    def _samples(self, key: str) -> Path:
        return self.root / "samples" / f"{key}.jsonl"

    def _partial(self, key: str) -> Path:
        return self.root / "partial" / (f"{key}.jsonl" if self.tag is None else f"{key}.{self.tag}.jsonl")

    def _partials(self, key: str) -> list[Path]:
        """Every partial file of ``key``: the plain one and those of data-parallel processes."""
        folder = self.root / "partial"
        return sorted({*folder.glob(f"{key}.jsonl"), *folder.glob(f"{key}.*.jsonl")})

    def done(self, key: str) -> bool:
        return self._row(key).is_file()

    def row(self, key: str) -> dict[str, Any]:
        return json.loads(self._row(key).read_text(encoding="utf-8"))

    def partial(self, key: str) -> dict[Any, dict[str, Any]]:
        """Per-sample records of an unfinished point from all its partial files (every process's),
        by question id (later lines of a file win)."""
        return {r["question_id"]: r for path in self._partials(key) for r in _read_jsonl(path)}

    def clear_partial(self, key: str) -> None:
        for path in self._partials(key):
            path.unlink(missing_ok=True)

    def append_partial(self, key: str, records: Sequence[Mapping[str, Any]]) -> None:
        """Append one batch of per-sample records in one write (flushed to disk)."""
        path = self._partial(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(r, default=str) + "\n" for r in records)
        with path.open("a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def finish(self, key: str, row: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> None:
        """Write the point's per-sample records, then its row (which marks it done), atomically."""
        _atomic_write(self._samples(key), "".join(json.dumps(r, default=str) + "\n" for r in records))
        _atomic_write(self._row(key), json.dumps(dict(row), indent=1, default=str))
        self.clear_partial(key)

    def rows(self) -> list[dict[str, Any]]:
        folder = self.root / "points"
        return (
            [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.json"))]
            if folder.is_dir()
            else []
        )


def load_results(root: str | Path) -> pd.DataFrame:
    """Every finished point under ``root`` as one DataFrame, one row per point.

    Nested fields are flattened with dots (``config.model.path``, ``per_family.color``,
    ``params.layer``) except :data:`UNFLATTENED` ones (``spatial``: one column of dicts, None
    in rows written without it); lists stay lists. Duplicate keys (the same point copied from
    several machines) are kept once.
    """
    import pandas as pd

    rows = ResultStore(root).rows()
    if not rows:
        return pd.DataFrame()
    whole = {name: [row.pop(name, None) for row in rows] for name in UNFLATTENED}
    df = pd.json_normalize(rows, sep=".")
    for name, values in whole.items():
        df[name] = pd.Series(values, index=df.index, dtype=object)
    return df.drop_duplicates(subset="key").sort_values("created", kind="stable").reset_index(drop=True)


def load_samples(root: str | Path) -> pd.DataFrame:
    """Every per-sample record of the finished points under ``root`` (column ``key`` names the point)."""
    import pandas as pd

    folder = Path(root) / "samples"
    frames = []
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        frame = pd.DataFrame(_read_jsonl(path))
        frame.insert(0, "key", path.stem)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
