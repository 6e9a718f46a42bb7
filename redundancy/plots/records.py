"""The recorded artefact behind the attention-map and retained-token figures (Fig. 1b, Fig. 5).

    python -m redundancy.maps model=micro-llava-vanilla      # writes results/maps/micro-llava-vanilla.npz
    record = load_maps("results/maps/micro-llava-vanilla.npz")

One ``.npz`` per model (numpy + JSON only, so figures never load a model):

* ``meta``       JSON: model, checkpoint id, grid side, depth, recorded layers, the query whose attention
                 was recorded, the PyramidDrop schedule, and per question its id, text, answers,
                 family, the two predictions and the image-token indices of the objects it names.
* ``attention``  ``[questions, layers, N]`` float16: the query's attention over the ``N`` image tokens
                 in each recorded layer of the unmodified model (softmax over every key, head mean).
* ``kept``       ``[questions, boundaries, N]`` bool: the image tokens kept from each PyramidDrop
                 boundary on.
* ``image_<i>``  ``[H, W, 3]`` uint8: question ``i``'s image as the model saw it (after the processor).

Image tokens are indexed in raster order of a ``grid x grid`` patch grid (LLaVA-1.5 and micro-LLaVA;
LLaVA-NeXT's any-res layout is not a square grid and is refused by the recorder).
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SUFFIX = ".npz"


@dataclass(frozen=True)
class Question:
    """One recorded question. ``evidence``: image-token indices of the objects it is about."""

    question_id: str
    question: str
    answers: list[str]
    family: str
    prediction: str  # unmodified model
    prediction_drop: str  # under the recorded PyramidDrop schedule
    evidence: list[int] = field(default_factory=list)


@dataclass
class MapRecord:
    """Attention maps and kept tokens of a few questions on one model (see the module docstring)."""

    model: str
    checkpoint_id: str
    grid: int
    num_layers: int  # decoder layers of the language model
    query: str  # the ranker whose query row was recorded: last | instruction
    layers: list[int]
    schedule: dict[str, Any]  # DropSchedule.record() of the PyramidDrop run
    questions: list[Question]
    images: list[np.ndarray]
    attention: np.ndarray  # [questions, layers, N] float
    kept: np.ndarray  # [questions, boundaries, N] bool
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        q, n = len(self.questions), self.grid * self.grid
        if self.attention.shape != (q, len(self.layers), n):
            raise ValueError(f"attention has shape {self.attention.shape}, expected {(q, len(self.layers), n)}")
        if self.kept.shape[::2] != (q, n) or self.kept.shape[1] != len(self.schedule.get("boundaries", [])):
            raise ValueError(f"kept has shape {self.kept.shape}, expected (questions={q}, boundaries, N={n})")
        if len(self.images) != q:
            raise ValueError(f"{len(self.images)} images for {q} questions")

    @property
    def boundaries(self) -> list[int]:
        return list(self.schedule["boundaries"])

    def attention_at(self, question: int, layer: int) -> np.ndarray:
        """``[grid, grid]`` attention of question ``question`` at decoder layer ``layer``."""
        if layer not in self.layers:
            raise ValueError(f"layer {layer} was not recorded; recorded: {self.layers}")
        return self.attention[question, self.layers.index(layer)].astype(np.float32).reshape(self.grid, self.grid)

    def kept_at(self, question: int, stage: int) -> np.ndarray:
        """``[grid, grid]`` bool: tokens present in ``stage`` (0 = before the first boundary: all)."""
        n = self.grid * self.grid
        mask = np.ones(n, bool) if stage == 0 else self.kept[question, stage - 1]
        return mask.reshape(self.grid, self.grid)


def save_maps(record: MapRecord, path: str | Path) -> Path:
    """Write ``record`` to ``path`` (compressed ``.npz``, written to a temporary name then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": record.model, "checkpoint_id": record.checkpoint_id, "grid": record.grid,
        "num_layers": record.num_layers, "query": record.query,
        "layers": record.layers, "schedule": record.schedule, "provenance": record.provenance,
        "questions": [asdict(q) for q in record.questions],
    }
    # Any: numpy's stubs read `**arrays` as savez_compressed's own keywords (allow_pickle: bool)
    arrays: dict[str, Any] = {f"image_{i}": np.asarray(img, np.uint8) for i, img in enumerate(record.images)}
    buf = io.BytesIO()
    np.savez_compressed(
        buf, meta=np.array(json.dumps(meta)), attention=record.attention.astype(np.float16),
        kept=record.kept.astype(bool), **arrays,
    )
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)
    return path


def load_maps(path: str | Path) -> MapRecord:
    with np.load(Path(path), allow_pickle=False) as f:
        meta = json.loads(str(f["meta"]))
        questions = [Question(**q) for q in meta["questions"]]
        images = [f[f"image_{i}"] for i in range(len(questions))]
        return MapRecord(
            model=meta["model"], checkpoint_id=meta["checkpoint_id"], grid=meta["grid"], num_layers=meta["num_layers"],
            query=meta["query"],
            layers=meta["layers"], schedule=meta["schedule"], questions=questions, images=images,
            attention=f["attention"].astype(np.float32), kept=f["kept"], provenance=meta.get("provenance", {}),
        )


def load_all_maps(folder: str | Path) -> dict[str, MapRecord]:
    """Every artefact in ``folder`` by file stem (sorted); empty when the folder does not exist."""
    folder = Path(folder)
    return {p.stem: load_maps(p) for p in sorted(folder.glob(f"*{SUFFIX}"))} if folder.is_dir() else {}


def evidence_share(attention: np.ndarray, evidence: list[int]) -> float:
    """Fraction of the image attention that falls on the ``evidence`` tokens (NaN without evidence)."""
    flat = np.nan_to_num(np.asarray(attention, np.float64).ravel())
    total = flat.sum()
    if not evidence or total <= 0:
        return float("nan")
    return float(flat[evidence].sum() / total)
