"""The sweep: evaluate a model with image tokens dropped, one result row per point.

    python -m redundancy.sweep layer=16 ratio=0.1                                  # one point
    python -m redundancy.sweep layer=[2,8,16,24] ratio=[0,0.1,0.25,0.5,0.75,1]     # a grid, shared prefixes
    python -m redundancy.sweep -m layer=2,8 ratio=0.1,0.5                          # multirun: a job per point
    python -m redundancy.sweep experiment=redundancy                               # a study (conf/sweep/experiment/)
    python -m redundancy.sweep model=llava-1.5 model.path=<hf dir> data=textvqa data.path=<dir>

Defaults: the shipped ``micro-llava-vanilla`` on the shipped microvqa test set, ``method=drop``.
``layer`` and ``ratio`` are shorthands for ``method.layer`` / ``method.ratio``; any of
``layer``, ``ratio``, ``K``, ``R``, ``lam``, ``ranker``, ``rank_layer``, ``positions`` may be
a list, and the sweep runs the product in one process (:mod:`redundancy.grid`, sharing the
layers before each drop unless ``share=false``). Every point writes one row and its
per-sample records under ``out`` (:mod:`redundancy.results`); points already there are skipped.
``out`` defaults to the scratch folder ``outputs/sweep``; only the study commands (the experiment
configs, which set ``study=true``) write the published ``results/``, and only whole evaluations.
A seeded ranker (``ranker=random``) gives one point per seed index (``seed=[0,1,2]`` or
``seeds=5``), each drawing with a seed derived from the checkpoint, layer, ratio and index.
With ``spatial`` (by default in studies) each row also counts where the kept image tokens lie
and how many are sinks (:mod:`redundancy.spatial`; rows written before have ``spatial: null``).
Under ``accelerate launch`` the processes share each point's questions (:mod:`redundancy.distributed`).
The whole configuration is checked (ranges, layers against the model's depth read from its
``config.json``) before any weights load.
"""

# No `from __future__ import annotations`: launchers (submitit) rebuild the config classes in
# fresh processes, where OmegaConf must read their field types without this module's globals.
import dataclasses
import datetime
import itertools
import json
import platform
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

import redundancy
from redundancy.cli import launch, run_entry
from redundancy.data import Sample, load_dataset, metric_for, score
from redundancy.data import evaluate as score_predictions
from redundancy.distributed import Processes, processes
from redundancy.flops import TERA, full_sequence_flops, image_part_flops
from redundancy.grid import PrefillTiming, SampleResult, run_grid, time_prefill
from redundancy.loading import TEST_SET, git_revision, load_model, resolve, resolve_device, resolve_dtype
from redundancy.locks import PointLocks
from redundancy.presets import ModelDims
from redundancy.results import ResultStore, checkpoint_fingerprint, fingerprint, point_key
from redundancy.schedule import SEEDED_RANKERS, DropSchedule, DropSpec, MethodSpec
from redundancy.spatial import question_numbers, summarise
from redundancy.stats import LEVEL as CI_LEVEL
from redundancy.stats import confidence_interval
from redundancy.validate import check_device, check_weights, check_writable

FLOPS_CONVENTION = "eq4: 1 MAC = 1 FLOP; LM layer 4nd^2 + 2n^2d + 3ndm; LM prefill, mean over samples"
STUDY_FOLDER = Path("results")  # the published study (relative to where the command runs): study=true only


# -------------------------------------------------------------------- schema
@dataclass
class ModelConfig:
    name: str = MISSING  # the label in result rows
    path: str = MISSING  # a shipped checkpoint name or a local HF model directory
    num_layers: int | None = None  # declared depth: layers are checked against it before anything loads
    dtype: str = "float32"  # float32 | bfloat16 | float16
    attn: str = "sdpa"  # sdpa | eager | flash_attention_2
    device: str = "auto"  # auto = cuda when available, else cpu


@dataclass
class DataConfig:
    name: str = "microvqa"
    path: str | None = MISSING  # null: the shipped microvqa test set
    image_dir: str | None = None  # TextVQA images (default: <path>/images, else <path>/train_images)
    limit: int | None = None  # evaluate the first `limit` questions only
    prompt_suffix: str = ""  # appended to every question
    max_new_tokens: int = 4


@dataclass
class TimingConfig:
    repeats: int = 3  # timed prefills per point (median recorded); 0 = no timing
    warmup: int = 1
    batch_size: int = 1


@dataclass
class SweepConfig:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    method: Any = MISSING
    layer: Any = None  # shorthand for method.layer (method=drop)
    ratio: Any = None  # shorthand for method.ratio (method=drop)
    reference: bool | None = None  # also evaluate vanilla; null = when the grid has more than one point
    share: bool = True  # compute the layers before each drop once per batch (redundancy.grid)
    batch_size: int = 32
    seed: Any = 0  # seed index of seeded rankers (random): an int or a list; the first also seeds torch
    seeds: int | None = None  # seed indices 0..seeds-1 (instead of `seed`)
    study: bool = False  # a run of the published study (the experiment configs): may write into results/
    out: str = "outputs/sweep"  # the result store; trial runs stay out of the published results/
    rerun: bool = False  # recompute points already in `out`
    spatial: bool | None = None  # count where the kept image tokens lie (row field `spatial`); null = in studies
    threads: int = 0  # torch CPU threads; 0 = torch's default
    progress: bool = True
    timing: TimingConfig = field(default_factory=TimingConfig)


# `model` and `data` are typed through SweepConfig; `method` is the group every command shares
# (redundancy.schedule.MethodSpec, registered by redundancy.cli).
ConfigStore.instance().store(name="sweep_schema", node=SweepConfig)


# ------------------------------------------------------------------ points
def _axis(value: Any, name: str) -> list[Any]:
    """A grid axis: a scalar is a one-point axis; a list must not be empty."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise ValueError(f"{name}=[] is empty; give at least one value")
    return values


def grid_of(spec: MethodSpec) -> list[MethodSpec]:
    """The scalar specs of ``spec``: the product of its list-valued fields (PyramidDrop's ``layers``
    is one value, its boundary list), in the order the fields are declared."""
    fields = [f.name for f in dataclasses.fields(spec) if f.name not in ("name", "layers", "ratios", "seed")]
    axes = [_axis(getattr(spec, f), f) for f in fields]
    return [replace(spec, **dict(zip(fields, combo))) for combo in itertools.product(*axes)]


def seed_indices(cfg: SweepConfig) -> list[int]:
    """The seed indices of seeded rankers: ``0..seeds-1`` when ``seeds`` is given, else ``seed``
    (an int or a list)."""
    if cfg.seeds is not None:
        if isinstance(cfg.seeds, bool) or not isinstance(cfg.seeds, int) or cfg.seeds < 1:
            raise ValueError(f"seeds={cfg.seeds!r} is outside the allowed range [1, inf)")
        if cfg.seed not in (0, [0]):
            raise ValueError(f"seeds={cfg.seeds} and seed={cfg.seed} both choose the seeds; give one of them")
        return list(range(cfg.seeds))
    values = _axis(cfg.seed, "seed")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"seed={v!r} is not a seed index (an integer >= 0)")
    return list(dict.fromkeys(values))


def schedules_from_config(cfg: SweepConfig, num_layers: int | None = None,
                          checkpoint_id: str | None = None) -> list[DropSchedule]:
    """The points of ``cfg``: the product of its list-valued settings, plus the vanilla
    reference when asked (``reference``; by default for more than one point). Every value
    is checked, layers against ``num_layers`` when known. A seeded ranker (random) gives one
    point per seed index, each with the seed :meth:`DropSchedule.seeded` derives from
    ``checkpoint_id`` (the model's fingerprint; before it is known, the seed is the index)."""
    m = cfg.method
    if not isinstance(m, DropSpec) and (cfg.layer is not None or cfg.ratio is not None):
        raise ValueError(f"layer= and ratio= are shorthands for method=drop; method={m.name} takes its own parameters")
    if isinstance(m, DropSpec):
        m = replace(m, layer=cfg.layer if cfg.layer is not None else m.layer,
                    ratio=cfg.ratio if cfg.ratio is not None else m.ratio)
    indices = seed_indices(cfg)
    points = [DropSchedule.from_spec(spec, num_layers) for spec in grid_of(m)]
    points = [p if p.is_vanilla or p.ranker not in SEEDED_RANKERS
              else p.seeded(checkpoint_id, i) if checkpoint_id is not None else replace(p, seed=i)
              for p in points for i in (indices if p.ranker in SEEDED_RANKERS else [0])]
    reference = cfg.reference if cfg.reference is not None else len(points) > 1
    if reference and not any(p.is_vanilla for p in points):
        points.insert(0, DropSchedule.vanilla())
    unique = {json.dumps(p.record(), sort_keys=True): p for p in points}
    return list(unique.values())


def label(schedule: DropSchedule) -> str:
    """``drop layer=16 ratio=0.1``: the method and the parameters the user gave."""
    params = " ".join(f"{k}={v}" for k, v in schedule.params.items())
    return f"{schedule.method} {params}".strip()


# -------------------------------------------------------------------- inputs
def _check_settings(cfg: SweepConfig) -> None:
    try:
        resolve_dtype(cfg.model.dtype)
    except ValueError as err:
        raise ValueError(f"model.{err}") from None
    for name, value, low in (("batch_size", cfg.batch_size, 1), ("data.max_new_tokens", cfg.data.max_new_tokens, 1),
                             ("timing.repeats", cfg.timing.repeats, 0), ("timing.warmup", cfg.timing.warmup, 0),
                             ("timing.batch_size", cfg.timing.batch_size, 1), ("threads", cfg.threads, 0)):
        if value < low:
            raise ValueError(f"{name}={value} is outside the allowed range [{low}, inf)")
    if cfg.data.limit is not None and cfg.data.limit < 1:
        raise ValueError(f"data.limit={cfg.data.limit} is outside the allowed range [1, inf)")
    check_device(cfg.model.device, "model.device")
    check_writable(cfg.out, "out")


def published(folder: str | Path) -> bool:
    """Whether ``folder`` lies in the published study (:data:`STUDY_FOLDER`, from where the command runs)."""
    study = STUDY_FOLDER.resolve()
    target = Path(folder).resolve()
    return target == study or study in target.parents


def check_destination(cfg: SweepConfig) -> None:
    """Only the study commands (``study=true``, set by the experiment configs) write into the
    published ``results/``, and only whole evaluations (no ``data.limit``); trial sweeps go to
    ``outputs/`` (the default ``out``)."""
    if published(cfg.out) and not cfg.study:
        raise ValueError(f"out={cfg.out} is inside the published study ({STUDY_FOLDER}/), which only the study "
                         "commands write (experiment=..., study=true); "
                         "trial sweeps write to outputs/sweep (the default)")
    if cfg.study and cfg.data.limit is not None:
        raise ValueError(f"study=true evaluates every question; data.limit={cfg.data.limit} makes a trial run "
                         "(leave study=false: it writes to outputs/sweep)")


def model_depth(path: Path) -> int:
    """Decoder layers of the language model in ``path`` (from config.json; no weights load)."""
    from transformers import AutoConfig  # late: keeps `import redundancy.sweep` light

    config = AutoConfig.from_pretrained(path)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.num_hidden_layers)


def dataset_file(data: DataConfig) -> tuple[Path, Path | None]:
    """The questions file of ``data`` and its image directory (TextVQA only).

    ``path``: null (the shipped test set), a local-format directory (``questions.jsonl``),
    a TextVQA ``.json``, or a directory holding exactly one TextVQA ``.json``.
    """
    if data.path is None:
        return TEST_SET / "questions.jsonl", None
    path = Path(data.path)
    if path.is_dir() and (path / "questions.jsonl").is_file():
        return path / "questions.jsonl", None
    if path.is_dir():
        found = sorted(path.glob("*.json"))
        if len(found) != 1:
            names = [p.name for p in found]
            raise ValueError(
                f"data.path={data.path}: expected questions.jsonl or one TextVQA .json file, found {names}"
            )
        path = found[0]
    if not path.is_file():
        raise ValueError(f"data.path={data.path} does not exist")
    if path.suffix != ".json":
        return path, None
    if data.image_dir is not None:
        return path, Path(data.image_dir)
    for name in ("images", "train_images"):  # the official archives unpack to train_images/
        if (path.parent / name).is_dir():
            return path, path.parent / name
    return path, path.parent / "images"


def load_samples(data: DataConfig) -> tuple[list[Sample], Path]:
    file, image_dir = dataset_file(data)
    samples = load_dataset(file, image_dir)
    if data.limit is not None:
        samples = samples[: data.limit]
    if data.prompt_suffix:
        samples = [replace(s, question=s.question + data.prompt_suffix) for s in samples]
    metric_for(samples)  # refuses unscorable data (no answers) before the model loads
    return samples, file


# ------------------------------------------------------------------- records
def sample_records(
    samples: Sequence[Sample], results: Sequence[SampleResult], metric: str, seconds: float, shared: bool
) -> list[dict[str, Any]]:
    """Per-sample records of one answered batch; ``seconds`` (the batch's wall time) is split evenly."""
    by_id = {s.question_id: s for s in samples}
    out = []
    for r in results:
        s = by_id[r.question_id]
        value = score(r.prediction, s.answers, metric)
        out.append({
            "question_id": r.question_id, "family": s.family, "prediction": r.prediction, "score": value,
            "correct": value == 1.0, "kept": r.kept, "n_image": r.kept[0], "n_text": r.n_text,
            "seconds": seconds / len(results), "shared_prefix": shared,
            **({"spatial": r.spatial} if r.spatial is not None else {}),
            **({"prior": r.prior} if r.prior else {}),
        })
    return out


def committed(record: dict[str, Any]) -> dict[str, Any]:
    """A per-sample record as the store's samples keep it: a question's spatial counts (in the partial
    records until its point is done; the row holds their sum) reduced to the numbers paired tests
    read (:func:`redundancy.spatial.question_numbers`)."""
    out = {k: v for k, v in record.items() if k != "spatial"}
    if record.get("spatial") is not None:
        out.update(question_numbers(record["spatial"]))
    return out


def spatial_enabled(cfg: SweepConfig) -> bool:
    """Whether the sweep counts where the kept image tokens lie: ``spatial``, by default in studies."""
    return cfg.study if cfg.spatial is None else cfg.spatial


def flops_summary(config: Any, schedule: DropSchedule, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean per-sample LM prefill FLOPs (redundancy.flops), image tokens per layer and per stage."""
    image = full = avg = 0.0
    counts = Counter((r["n_image"], r["n_text"]) for r in records)
    for (n_image, n_text), c in counts.items():
        dims = ModelDims.from_hf_config(config, n_image=n_image, n_text=n_text)
        image += c * image_part_flops(dims, schedule)
        full += c * full_sequence_flops(dims, schedule)
        avg += c * schedule.average_tokens_per_layer(n_image, dims.num_layers)
    n = len(records)
    stages = [sum(r["kept"][s] for r in records) / n for s in range(len(schedule.boundaries) + 1)]
    return {"image_tflops": image / n / TERA, "full_tflops": full / n / TERA, "avg_image_tokens": avg / n,
            "kept_per_stage": stages, "flops_convention": FLOPS_CONVENTION}


@dataclass
class _Context:
    """What every row of one sweep shares."""

    cfg: SweepConfig
    samples: list[Sample]
    metric: str
    identity: dict[str, Any]
    provenance: dict[str, Any]


def point_identity(ctx: _Context, schedule: DropSchedule) -> dict[str, Any]:
    """What makes two evaluations the same point: model weights, data, answer settings, schedule."""
    identity = {**ctx.identity, "schedule": schedule.record()}
    if schedule.ranker == "debias" and not schedule.is_vanilla:  # a prior other than the default one is part of it
        from redundancy.priors import DEFAULT_SOURCE, prior_source

        if prior_source() != DEFAULT_SOURCE:
            identity["prior"] = prior_source()
    return identity


def point_config(cfg: SweepConfig, schedule: DropSchedule) -> dict[str, Any]:
    """The resolved configuration of one point (list-valued settings replaced by the point's values)."""
    out = asdict(cfg)
    method = {"name": schedule.method, **schedule.params}
    if not schedule.is_vanilla:
        method.update(ranker=schedule.ranker, rank_layer=schedule.rank_layer, positions=schedule.positions)
    out["method"] = method
    out["layer"] = schedule.params.get("layer")
    out["ratio"] = schedule.params.get("ratio")
    return out


def prefill_columns(prefill: PrefillTiming | None, batch_size: int) -> dict[str, Any]:
    """A row's timing: the point's prefill, the unmodified model's timed in the same rounds and the
    paired speedup (None without timing)."""
    if prefill is None:
        return dict.fromkeys(("prefill_ms", "prefill_vanilla_ms", "prefill_speedup", "prefill_rounds",
                              "prefill_batch"))
    return {"prefill_ms": prefill.ms, "prefill_vanilla_ms": prefill.vanilla_ms, "prefill_speedup": prefill.speedup,
            "prefill_rounds": prefill.rounds, "prefill_batch": batch_size}


def build_row(ctx: _Context, schedule: DropSchedule, key: str, records: list[dict[str, Any]], model: Any,
              prefill: PrefillTiming | None) -> dict[str, Any]:
    cfg = ctx.cfg
    preds = {r["question_id"]: r["prediction"] for r in records}
    result = score_predictions(ctx.samples, preds, ctx.metric)
    low, high, ci_method = confidence_interval([r["score"] for r in records], CI_LEVEL)
    first = schedule.boundaries[0] if schedule.boundaries else None
    return {
        "key": key,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "point": label(schedule),
        "model": cfg.model.name, "checkpoint": cfg.model.path, "checkpoint_id": ctx.identity["model"]["checkpoint_id"],
        "data": cfg.data.name, "data_id": ctx.identity["data"]["data_id"], "metric": ctx.metric,
        "method": schedule.method, "params": schedule.params,
        "layer": first if schedule.method in ("drop", "fastv") else None,
        "ratio": schedule.ratios[0] if schedule.method in ("drop", "fastv") else None,
        "boundaries": list(schedule.boundaries), "ratios": list(schedule.ratios),
        "ranker": schedule.ranker, "rank_layer": schedule.rank_layer, "positions": schedule.positions,
        "seed": schedule.seed, "seed_index": schedule.params.get("seed") if schedule.ranker in SEEDED_RANKERS else None,
        "accuracy": result["accuracy"], "ci_low": low, "ci_high": high, "ci_level": CI_LEVEL, "ci_method": ci_method,
        "n": result["n"], "missing": result["missing"], "per_family": result["per_family"],
        **flops_summary(model.config, schedule, records),
        **prefill_columns(prefill, cfg.timing.batch_size),
        "wall_s": sum(r["seconds"] for r in records),
        "shared_prefix": any(r.get("shared_prefix", False) for r in records),
        "prior": next((r["prior"] for r in records if r.get("prior")), None),  # debias: the prior's key
        "spatial": summarise([r.get("spatial") for r in records]),
        "batch_size": cfg.batch_size, "device": str(next(model.parameters()).device),
        **ctx.provenance,
        "config": point_config(cfg, schedule),
    }


# ----------------------------------------------------------------------- run
def run(cfg: SweepConfig) -> str:
    """Evaluate every point of ``cfg`` not yet in ``cfg.out``; return the summary table."""
    started = time.perf_counter()
    _check_settings(cfg)
    check_destination(cfg)
    schedules_from_config(cfg, cfg.model.num_layers)  # every value checked before any file is read
    model_dir = resolve(cfg.model.path)
    check_weights(model_dir)  # a broken file is named before anything is read or written
    depth = model_depth(model_dir)
    if cfg.model.num_layers is not None and cfg.model.num_layers != depth:
        raise ValueError(f"model.num_layers={cfg.model.num_layers} but {cfg.model.path} has {depth} layers")
    checkpoint_id = checkpoint_fingerprint(model_dir)
    schedules = schedules_from_config(cfg, depth, checkpoint_id)
    samples, data_file = load_samples(cfg.data)
    ctx = _Context(cfg, samples, metric_for(samples), identity={
        "model": {"checkpoint_id": checkpoint_id,
                  "dtype": cfg.model.dtype, "attn": cfg.model.attn},
        "data": {"name": cfg.data.name, "data_id": fingerprint([data_file]), "limit": cfg.data.limit,
                 "prompt_suffix": cfg.data.prompt_suffix, "max_new_tokens": cfg.data.max_new_tokens},
    }, provenance={})
    procs = processes()
    store = ResultStore(cfg.out)
    keys = [point_key(point_identity(ctx, s)) for s in schedules]
    pending = [i for i, k in enumerate(keys) if cfg.rerun or not store.done(k)]
    locks = PointLocks(cfg.out, enabled=not procs.distributed)
    busy = [i for i in pending if not locks.claim(keys[i])]  # another sweep into `out` evaluates these now
    pending = [i for i in pending if i not in busy and (cfg.rerun or not store.done(keys[i]))]
    procs.wait()  # every process has chosen its points before any row is written
    stats = None
    if pending:
        model, processor, device = _load(cfg, model_dir, procs.device)
        ctx.provenance = _provenance(cfg, device, procs)
        todo_schedules, todo_keys = [schedules[i] for i in pending], [keys[i] for i in pending]
        mine = procs.shard(samples, cfg.batch_size)
        if procs.distributed and cfg.rerun and procs.is_main:
            for k in todo_keys:
                store.clear_partial(k)
        procs.wait()
        writer = _PointWriter(ctx, ResultStore(cfg.out, procs.tag), model, processor, todo_schedules, todo_keys,
                              answer=mine, rows=not procs.distributed)
        torch.manual_seed(seed_indices(cfg)[0])
        _, stats = run_grid(
            model, processor, mine, writer.schedules, share=cfg.share, batch_size=cfg.batch_size,
            max_new_tokens=cfg.data.max_new_tokens, todo=writer.todo, on_batch=writer.on_batch,
            progress=cfg.progress and procs.is_main, spatial=spatial_enabled(cfg),
        )
        if procs.distributed:
            procs.wait()  # every shard answered: the main process reads them all back and writes the rows
            if procs.is_main:
                _PointWriter(ctx, store, model, processor, todo_schedules, todo_keys, resume=True)
            procs.wait()
    locks.wait([keys[i] for i in busy])  # their rows come from the other sweep
    locks.release()
    if not procs.is_main:
        mine = procs.shard(samples, cfg.batch_size)
        return (f"process {procs.rank} of {procs.world}: {len(mine)} of {len(samples)} questions per point "
                "(rows: process 0)")
    rows = [store.row(k) if store.done(k) else {} for k in keys]
    status = ["new" if i in pending else "other sweep" if i in busy else "done before" for i in range(len(keys))]
    return summary(cfg, schedules, rows, status, stats, time.perf_counter() - started)


class _PointWriter:
    """Collects the per-sample records of the points to evaluate, batch by batch (appended to
    each point's partial file), and writes a point's row as soon as all its samples are answered.
    Records left by a crashed run are read back, and only the missing samples are asked for.

    ``answer``: the questions this process answers (default: all; a data-parallel shard);
    ``rows=False``: only answer (the main process writes the rows); ``resume=True``: read the
    partial records back even when ``rerun`` (the main process gathering the shards)."""

    def __init__(self, ctx: _Context, store: ResultStore, model: Any, processor: Any,
                 schedules: list[DropSchedule], keys: list[str], answer: Sequence[Sample] | None = None,
                 rows: bool = True, resume: bool = False) -> None:
        self.ctx, self.store, self.model, self.processor = ctx, store, model, processor
        self.schedules, self.keys, self.rows = schedules, keys, rows
        ids = {s.question_id for s in (ctx.samples if answer is None else answer)}
        self.order = {s.question_id: n for n, s in enumerate(ctx.samples)}
        earlier = [{} if ctx.cfg.rerun and not resume else store.partial(k) for k in keys]
        self.records = [[r for q, r in done.items() if q in ids] for done in earlier]
        self.todo = [ids - set(done) for done in earlier]
        for j, todo in enumerate(self.todo):
            if not todo:  # every sample was answered before a crash: only the row is missing
                self.finish(j)

    def on_batch(self, j: int, results: list[SampleResult], seconds: float, shared: bool) -> None:
        # A batch may hold questions answered before a crash (when batch_size changed): keep the first answer.
        fresh = [r for r in results if r.question_id in self.todo[j]]
        recs = sample_records(self.ctx.samples, fresh, self.ctx.metric, seconds * len(fresh) / len(results), shared)
        self.store.append_partial(self.keys[j], recs)
        self.records[j].extend(recs)
        self.todo[j] -= {r.question_id for r in results}
        if not self.todo[j]:
            self.finish(j)

    def finish(self, j: int) -> None:
        """Time the point's prefill and write its row and per-sample records."""
        if not self.rows:
            return
        timing, schedule = self.ctx.cfg.timing, self.schedules[j]
        recs = sorted(self.records[j], key=lambda r: self.order[r["question_id"]])
        prefill: PrefillTiming | None = None
        if timing.repeats:
            prefill = time_prefill(self.model, self.processor, self.ctx.samples[: timing.batch_size], schedule,
                                   repeats=timing.repeats, warmup=timing.warmup)
        row = build_row(self.ctx, schedule, self.keys[j], recs, self.model, prefill)
        # The per-question counts live in the partial records only; the row holds their sum.
        self.store.finish(self.keys[j], row, [committed(r) for r in recs])


def _load(cfg: SweepConfig, model_dir: Path, launched: torch.device | None = None) -> tuple[Any, Any, torch.device]:
    """The model on ``model.device``; ``auto``: the launcher's device for this process, else cuda when available."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = cfg.model.device
    if device == "auto":
        device = str(launched) if launched is not None else str(resolve_device("auto"))
    model, processor = load_model(
        model_dir, dtype=resolve_dtype(cfg.model.dtype, device), device=device, attn_implementation=cfg.model.attn
    )
    return model, processor, torch.device(device)


def _provenance(cfg: SweepConfig, device: torch.device, procs: Processes) -> dict[str, Any]:
    parallel = {"processes": procs.world} if procs.distributed else {}  # wall_s then sums over processes
    return {
        **parallel,
        "dtype": cfg.model.dtype, "attn": cfg.model.attn, "threads": torch.get_num_threads(),
        "version": redundancy.__version__, "git": git_revision(), "torch": torch.__version__,
        "transformers": package_version("transformers"),
        "machine": platform.machine(),
        "accelerator": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }


def summary(cfg: SweepConfig, schedules: Sequence[DropSchedule], rows: Sequence[dict[str, Any]],
            status: Sequence[str], stats: Any, seconds: float) -> str:
    """The table printed at the end of a sweep."""
    head = ["point", "ranker", "pos", "acc %", f"{int(CI_LEVEL * 100)}% CI", "n", "img TFLOPs", "img tok/layer",
            "prefill ms", "wall s", "status"]
    table = []
    for i, (s, r) in enumerate(zip(schedules, rows)):
        if not r:
            table.append([label(s), "", "", "", "", "", "", "", "", "", "missing"])
            continue
        ranked = not s.is_vanilla
        ms = r.get("prefill_ms")
        table.append([
            r["point"], s.ranker if ranked else "-", s.positions if ranked else "-", f"{100 * r['accuracy']:.1f}",
            f"[{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]", str(r["n"]), f"{r['image_tflops']:.4g}",
            f"{r['avg_image_tokens']:.1f}", f"{ms:.1f}" if ms is not None else "-", f"{r['wall_s']:.1f}", status[i],
        ])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *table)]
    lines = ["  ".join(str(x).ljust(w) if c == 0 else str(x).rjust(w) for c, (x, w) in enumerate(zip(line, widths)))
             for line in [head, *table]]
    new = status.count("new")
    first = next((r for r in rows if r), {})
    info = (f"model {cfg.model.name} ({first.get('checkpoint_id', '?')}), data {cfg.data.name} "
            f"({first.get('n', '?')} questions, {first.get('metric', '?')}), out {cfg.out}: "
            f"{new} new, {len(schedules) - new} done before")
    if stats is None:
        sharing = "nothing new to evaluate (rerun=true recomputes)"
    elif not stats.shared:
        sharing = "sharing off"
    elif stats.prefix_hits + stats.prefix_misses:
        sharing = f"shared prefix: {stats.prefix_hits} replays, {stats.prefix_misses} recomputed"
    else:
        sharing = "no shared prefix (one point per batch)"
    tail = f"{seconds:.1f} s; {sharing}"
    return "\n".join([info, *lines, tail])


@hydra.main(version_base="1.3", config_path="conf/sweep", config_name="sweep")
def main(cfg: DictConfig) -> None:
    require_complete(cfg)
    run_entry(run, cfg)


def require_complete(cfg: DictConfig) -> None:
    """Exit with one ``error:`` line (code 2) when a mandatory value is missing (``model=llava-1.5``
    without ``model.path``), as :func:`redundancy.cli.run_entry` does for invalid values."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        print(f"error: {', '.join(missing)} must be given (e.g. {missing[0]}=<path>)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    launch(main, "sweep", check=_check_settings)
