"""VQA data on disk: one reader for the local format and TextVQA, the answer normaliser, and scoring.

    from redundancy.data import load_dataset, evaluate
    samples = load_dataset("redundancy/assets/microvqa/test")          # or a TextVQA json
    report = evaluate(samples, {s.question_id: my_model(s) for s in samples})

Two formats are read, told apart by the path:

**Local format** (a directory, or its ``questions.jsonl``), written by
:mod:`redundancy.micro.microvqa` and the one to convert other data into::

    <dir>/
      questions.jsonl      one JSON object per line (UTF-8)
      images/...           image files (PNG for the generated data)
      meta.json            optional: how the directory was made (not read here)

Each line holds ``question_id`` (int or str, unique in the file), ``image`` (path
relative to ``<dir>``), ``question``, ``answers`` (list of reference answers: one
for the generated data, ten for TextVQA-style human answers), ``family`` (the
question type), and any extra fields, which land in :attr:`Sample.meta`.

**TextVQA** (a ``.json`` file, the official release layout)::

    {"dataset_name": "textvqa", ..., "data": [{"question_id": 34602, "question": "...",
      "image_id": "003a8ae2ef43b901", "answers": [10 strings], ...}, ...]}

with images at ``<image_dir>/<image_id>.jpg`` (``image_dir`` defaults to the
json's sibling ``images/``; the official archives unpack to ``train_images/``,
which serves the val split too). The test split has no answers: its samples get
``answers == ()`` and cannot be scored. ``family`` is the record's
``question_type`` when present, else ``"textvqa"``.

**Scoring.** Answers are compared after :func:`normalize_answer`, the EvalAI /
M4C processor that LLaVA's TextVQA evaluation (``llava/eval/m4c_evaluator.py``)
copies from the official VQA evaluation: lowercase, drop punctuation, ``.``
unless between digits, articles (a, an, the), map number words ``zero``..``ten``
(and ``none``) to digits, restore common contractions. Two metrics:

* ``"exact"`` -- 1.0 when the normalised prediction equals a normalised
  reference, else 0.0 (the generated benchmark: one reference).
* ``"vqa"`` -- the VQA soft accuracy over n (normally 10) human answers: the mean,
  over the n leave-one-out subsets of n-1 answers, of ``min(#matches / 3, 1)``.
  With 10 answers, k matching humans score ``1, 1, 0.9, 0.6, 0.3, 0`` for
  ``k >= 4, 4, 3, 2, 1, 0`` (k = 3: three subsets keep 2 matches -> 2/3, seven keep 3 -> 1).

:func:`metric_for` picks ``"exact"`` when every sample has a single reference
and ``"vqa"`` otherwise, so callers never choose by hand.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

QUESTIONS_FILE = "questions.jsonl"


def patch_indices(box: Sequence[int], image_size: int, patch: int) -> list[int]:
    """Row-major image-token indices of the patches a ``[x, y, size]`` box touches."""
    x, y, size = box
    grid = image_size // patch
    cols = range(x // patch, (x + size - 1) // patch + 1)
    rows = range(y // patch, (y + size - 1) // patch + 1)
    return [r * grid + c for r in rows for c in cols]


@dataclass(frozen=True)
class Sample:
    """One question about one image. ``answers`` are raw reference strings (not normalised)."""

    question_id: int | str
    image_path: Path
    question: str
    answers: tuple[str, ...]
    family: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


# ---------------------------------------------------------------------------------------------
# Reading


def load_dataset(path: str | Path, image_dir: str | Path | None = None) -> list[Sample]:
    """Read a local-format directory / ``questions.jsonl``, or a TextVQA ``.json`` file.

    ``image_dir`` only applies to TextVQA (default: ``<json dir>/images``).
    Image paths are joined onto the dataset's directory as given (not resolved); files are not opened.
    """
    path = Path(path)
    if path.is_dir():
        path = path / QUESTIONS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no dataset at {path}")
    if path.suffix == ".jsonl":
        return _load_local(path)
    if path.suffix == ".json":
        return _load_textvqa(path, Path(image_dir) if image_dir is not None else path.parent / "images")
    raise ValueError(f"{path}: expected a directory, a .jsonl (local format) or a .json (TextVQA) file")


def _load_local(path: Path) -> list[Sample]:
    root = path.parent
    samples = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            try:
                qid, image, question = record.pop("question_id"), record.pop("image"), record.pop("question")
                answers, family = record.pop("answers"), record.pop("family")
            except KeyError as err:
                raise ValueError(f"{path}:{line_no}: missing field {err}") from None
            if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
                raise ValueError(f"{path}:{line_no}: answers must be a list of strings")
            samples.append(Sample(qid, root / image, question, tuple(answers), family, record))
    _check_unique(samples, path)
    return samples


def _load_textvqa(path: Path, image_dir: Path) -> list[Sample]:
    with path.open(encoding="utf-8") as f:
        blob = json.load(f)
    if not isinstance(blob, dict) or "data" not in blob:
        raise ValueError(f"{path}: not a TextVQA file (no top-level 'data' list)")
    samples = []
    for record in blob["data"]:
        record = dict(record)
        qid, question, image_id = record.pop("question_id"), record.pop("question"), record["image_id"]
        answers = tuple(record.pop("answers", ()))
        family = record.get("question_type", "textvqa")
        samples.append(Sample(qid, image_dir / f"{image_id}.jpg", question, answers, family, record))
    _check_unique(samples, path)
    return samples


def _check_unique(samples: Sequence[Sample], path: Path) -> None:
    ids = [s.question_id for s in samples]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: question_id values are not unique")


# ---------------------------------------------------------------------------------------------
# Normalising (EvalAI / M4C answer processor, as used for TextVQA in LLaVA's evaluation)

_NUMBER_MAP = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})
# The official look-behind is written ``(?!<=\d)`` -- a no-op look-ahead -- so a period is
# dropped whenever no digit follows it; kept as is to score like the official tool.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'  # each character on its own
_CONTRACTIONS = dict(
    pair.split(":")
    for pair in """
    aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've
    couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've
    hadn'tve:hadn't've hasnt:hasn't havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's
    howd:how'd howll:how'll hows:how's Id've:I'd've I'dve:I'd've Im:I'm Ive:I've isnt:isn't itd:it'd
    itd've:it'd've it'dve:it'd've itll:it'll let's:let's maam:ma'am mightnt:mightn't
    mightnt've:mightn't've mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've
    neednt:needn't notve:not've oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at
    'ow'sat:'ow's'at shant:shan't shed've:she'd've she'dve:she'd've she's:she's shouldve:should've
    shouldnt:shouldn't shouldnt've:shouldn't've shouldn'tve:shouldn't've somebody'd:somebodyd
    somebodyd've:somebody'd've somebody'dve:somebody'd've somebodyll:somebody'll somebodys:somebody's
    someoned:someone'd someoned've:someone'd've someone'dve:someone'd've someonell:someone'll
    someones:someone's somethingd:something'd somethingd've:something'd've something'dve:something'd've
    somethingll:something'll thats:that's thered:there'd thered've:there'd've there'dve:there'd've
    therere:there're theres:there's theyd:they'd theyd've:they'd've they'dve:they'd've theyll:they'll
    theyre:they're theyve:they've twas:'twas wasnt:wasn't wed've:we'd've we'dve:we'd've weve:we've
    werent:weren't whatll:what'll whatre:what're whats:what's whatve:what've whens:when's whered:where'd
    wheres:where's whereve:where've whod:who'd whod've:who'd've who'dve:who'd've wholl:who'll whos:who's
    whove:who've whyll:why'll whyre:why're whys:why's wont:won't wouldve:would've wouldnt:wouldn't
    wouldnt've:wouldn't've wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll y'allll:y'all'll
    yall'd've:y'all'd've y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd youd've:you'd've
    you'dve:you'd've youll:you'll youre:you're youve:you've
    """.split()
)


def normalize_answer(text: str) -> str:
    """The VQA/TextVQA answer normaliser: ``"Two."`` -> ``"2"``, ``"the Red"`` -> ``"red"``.

    Steps (EvalAI / M4C order): lowercase, delete ``,`` and ``?``, split ``'s``; turn
    whitespace into spaces; remove each punctuation mark (or replace it by a space when
    it is glued between words and the text has no digit-comma-digit); drop ``.`` not
    followed by a digit; map number words to digits; drop articles; expand contractions.
    Number words become digits, never the reverse, so ``"two"`` and ``"2"`` agree.
    """
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    has_digit_comma = _COMMA_STRIP.search(text) is not None
    out = text
    for p in _PUNCTUATION:
        glued = not (p + " " in text or " " + p in text or has_digit_comma)
        out = out.replace(p, " " if glued else "")
    out = _PERIOD_STRIP.sub("", out)
    words = [_NUMBER_MAP.get(w, w) for w in out.split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


# ---------------------------------------------------------------------------------------------
# Scoring

METRICS = ("exact", "vqa")


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised reference, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA soft accuracy: mean over the leave-one-out subsets of ``min(#matches / 3, 1)``.

    With n answers of which k match the prediction, k subsets hold k - 1 matches and
    n - k hold k, hence ``(k * min((k-1)/3, 1) + (n-k) * min(k/3, 1)) / n``.
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = normalize_answer(prediction)
    matches = [normalize_answer(a) == pred for a in answers]
    k, n = sum(matches), len(matches)
    return sum(min((k - m) / 3, 1.0) for m in matches) / n


def score(prediction: str, answers: Sequence[str], metric: str) -> float:
    """Score one prediction against its references with ``metric`` (``"exact"`` or ``"vqa"``)."""
    if metric == "exact":
        return exact_match(prediction, answers)
    if metric == "vqa":
        return vqa_accuracy(prediction, answers)
    raise ValueError(f"metric={metric!r} is unknown; choose from {METRICS}")


def metric_for(samples: Sequence[Sample]) -> str:
    """``"exact"`` when every sample has exactly one reference answer, else ``"vqa"``."""
    if any(not s.answers for s in samples):
        raise ValueError("some samples have no reference answers (a TextVQA test split?): cannot score")
    return "exact" if all(len(s.answers) == 1 for s in samples) else "vqa"


def evaluate(
    samples: Sequence[Sample], predictions: Mapping[int | str, str], metric: str | None = None
) -> dict[str, Any]:
    """Accuracy over ``samples`` (a missing prediction scores 0), overall and per family.

    Returns ``{"metric", "n", "accuracy", "per_family": {family: accuracy}, "missing"}``
    with accuracies as fractions in [0, 1].
    """
    metric = metric or metric_for(samples)
    by_family: dict[str, list[float]] = defaultdict(list)
    missing = 0
    for s in samples:
        pred = predictions.get(s.question_id)
        missing += pred is None
        by_family[s.family].append(0.0 if pred is None else score(pred, s.answers, metric))
    scores = [x for xs in by_family.values() for x in xs]
    return {
        "metric": metric,
        "n": len(scores),
        "accuracy": sum(scores) / len(scores) if scores else float("nan"),
        "per_family": {f: sum(xs) / len(xs) for f, xs in sorted(by_family.items())},
        "missing": missing,
    }


# ------------------------------------------------------------------ where a question's evidence lies

EVIDENCE_POSITIONS = ("top", "bottom", "both")


def evidence_position(record: Mapping[str, Any], image_size: int) -> str:
    """Where the evidence of a ``questions.jsonl`` record lies along the image's height.

    Rule: ``"top"`` when every evidence object's box lies wholly in the top half (pixel rows
    ``[0, image_size / 2)``), ``"bottom"`` when every one lies wholly in the bottom half (rows
    ``[image_size / 2, image_size)``), else ``"both"``: a box crosses the middle row, the evidence
    sits in both halves (a relation, most counts), or the question names no object (the whole
    image). Boxes are ``[x, y, size]`` (rows ``y .. y + size - 1``). The middle falls on a patch
    boundary for the shipped models (96 px, 8 px patches), so "top" evidence lies in the top
    half of the image-token rows."""
    boxes = [record["objects"][i]["box"] for i in record.get("evidence", [])]
    if not boxes:
        return "both"
    middle = image_size / 2
    if all(y + size <= middle for _, y, size in boxes):
        return "top"
    if all(y >= middle for _, y, _ in boxes):
        return "bottom"
    return "both"


def evidence_positions(directory: str | Path) -> dict[str, str]:
    """Question id -> :func:`evidence_position` for a written split (``meta.json`` gives the image size)."""
    image_size = int(json.loads((Path(directory) / "meta.json").read_text(encoding="utf-8"))["config"]["image_size"])
    lines = (Path(directory) / QUESTIONS_FILE).read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    return {r["question_id"]: evidence_position(r, image_size) for r in records}
