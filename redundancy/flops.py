"""FLOPs accounting for drop schedules (``docs/method.md`` section 7).

    python -m redundancy.flops model=llava-1.5-7b method=pdrop method.lam=0.5
    python -m redundancy.flops model=llava-1.5-7b method=fastv method.K=2 method.R=0.5
    python -m redundancy.flops model=llava-next-7b method=pdrop budget=10   # lam meeting 10 TFLOPs

Conventions (every figure names the one it uses):

* One multiply-accumulate (MAC) counts as ONE FLOP, as in FastV and PyramidDrop.
  Multiply by 2 for "hardware" FLOPs.
* A decoder layer over ``n`` tokens costs ``4 n d^2 + 2 n^2 d + 3 n d m``
  (PyramidDrop eq. 4, convention ``"eq4"``): q/k/v/o projections, QK^T and AV,
  and LLaMA's gated FFN with three ``d x m`` matrices. FastV's paper counts the
  FFN as ``2 n d m`` (convention ``"fastv"``). Both ignore grouped-query savings
  in k/v, norms, rotary embeddings and softmax, as the papers do.
* **Image part** (the paper's tables): ``n`` = the image tokens each LM layer
  sees during prefill; text tokens, the vision encoder and decoding left out.
* **Full sequence**: ``n`` = every prompt token of the layer (``n_text`` + image
  tokens), LM prefill only (no embedding or LM head: generation needs only the
  last position's logits).
* **Ranking overhead** and **vision encoder + projector**: see their functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, get_args

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from redundancy.cli import launch, run_entry
from redundancy.presets import ModelDims, get_preset
from redundancy.schedule import DropSchedule, FastVSpec, MethodSpec, PDropSpec

Convention = Literal["eq4", "fastv"]
CONVENTIONS: tuple[str, ...] = get_args(Convention)
# FFN matrices per convention: LLaMA's gated FFN has three (gate, up, down);
# FastV's paper counts two, as for a plain MLP.
_FFN_MATRICES: dict[str, int] = {"eq4": 3, "fastv": 2}
_CONVENTION_TEXT: dict[str, str] = {
    "eq4": "1 MAC = 1 FLOP; LM layer 4nd^2 + 2n^2d + 3ndm (PyramidDrop eq. 4)",
    "fastv": "1 MAC = 1 FLOP; LM layer 4nd^2 + 2n^2d + 2ndm (FastV's count)",
}
# Rankers that never look at attention scores, hence cost no FLOPs to rank.
_FREE_RANKERS = ("random", "uniform")
TERA = 1e12


# ------------------------------------------------------------------ formulas
def layer_flops(n: int, d: int, m: int, *, convention: Convention = "eq4", attention: bool = True) -> int:
    """FLOPs (1 MAC = 1 FLOP) of one LM decoder layer over ``n`` tokens.

    ``4 n d^2 + 2 n^2 d + 3 n d m`` (PyramidDrop eq. 4, after FastV); convention
    ``"fastv"`` counts the FFN as ``2 n d m``. ``attention=False`` drops the
    quadratic ``2 n^2 d`` term, the approximation under which PyramidDrop's cost
    ratio has the closed form of :func:`pdrop_ratio_closed_form`.
    """
    if convention not in _FFN_MATRICES:
        raise ValueError(f"convention={convention!r} is unknown; choose one of {list(CONVENTIONS)}")
    quadratic = 2 * n * n * d if attention else 0
    return 4 * n * d * d + quadratic + _FFN_MATRICES[convention] * n * d * m


def vision_layer_flops(n: int, d: int, m: int) -> int:
    """FLOPs (1 MAC = 1 FLOP) of one ViT (CLIP) layer: ``4 n d^2 + 2 n^2 d + 2 n d m`` (2-matrix FFN)."""
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def pdrop_ratio_closed_form(lam: float, stages: int) -> float:
    """PyramidDrop image-part cost relative to vanilla with the attention term ignored
    and equal stages: ``(1 - lam^S) / (S (1 - lam))`` (docs/method.md section 7); 0.46875 at lam=0.5, S=4."""
    if lam == 1.0:
        return 1.0  # the limit of the geometric sum
    return (1.0 - lam**stages) / (stages * (1.0 - lam))


def _lm_flops(tokens: Sequence[int], dims: ModelDims, convention: Convention, attention: bool = True) -> int:
    return sum(layer_flops(n, dims.hidden, dims.ffn, convention=convention, attention=attention) for n in tokens)


def image_part_flops(
    dims: ModelDims, schedule: DropSchedule, *, convention: Convention = "eq4", attention: bool = True
) -> int:
    """LM prefill FLOPs with ``n`` = image tokens of each layer (the paper's tables)."""
    return _lm_flops(schedule.tokens_per_layer(dims.n_image, dims.num_layers), dims, convention, attention)


def full_sequence_flops(dims: ModelDims, schedule: DropSchedule, *, convention: Convention = "eq4") -> int:
    """LM prefill FLOPs with ``n`` = ``n_text`` + image tokens of each layer (no embedding, no LM head)."""
    tokens = [dims.n_text + n for n in schedule.tokens_per_layer(dims.n_image, dims.num_layers)]
    return _lm_flops(tokens, dims, convention)


def ranking_flops(dims: ModelDims, schedule: DropSchedule, n_query: int = 1) -> int:
    """FLOPs (1 MAC = 1 FLOP) spent choosing the kept tokens, summed over boundaries.

    At boundary ``K`` the ``n_query`` query rows score every key they can see,
    ``kv_len = n_text + image tokens of layer K-1``, in every head:
    ``n_query * kv_len * d`` (QK^T only: head_dim x heads = d; grouped-query
    attention repeats keys, so it saves nothing here; AV is not needed).
    ``rank_layer="next"`` also projects with layer ``K``'s weights the queries,
    ``n_query * d * d``, and the keys of all ``kv_len`` tokens,
    ``kv_len * d * d_kv`` with ``d_kv = kv_heads * head_dim`` (the official code
    recomputes them; ``stage_last`` reads them from layer ``K-1``). Softmax, head
    mean and top-k are ``O(heads * kv_len)`` (no factor ``d``) and left out.
    ``random`` / ``uniform`` rankers cost 0. The other rankers (docs/method.md section 3):

    * ``mean``: the image tokens of layer ``K-1`` are query rows too, ``n_query`` counting the
      text rows: ``(n_query + image tokens) * kv_len * d`` (an upper bound: an image row sees
      only the keys before it);
    * ``norope``: plus rotating the query rows and keys back, ``2 (n_query * d + kv_len * d_kv)``;
    * ``nosink`` / ``nosink_keep``: plus the norms of the image tokens, ``image tokens * d``;
    * ``vision_cls`` (before the LLM, once per image whatever the boundaries): the [CLS] query and
      the keys of the vision tower's feature layer recomputed, and the [CLS] row of QK^T,
      ``crops * (d_v^2 + vision_tokens * d_v^2 + vision_tokens * d_v)``;
    * ``debias``: as ``last`` (the division by the prior is one per image token, no factor ``d``);
      the prior's calibration prefills are made once per checkpoint and left out;
    * ``pool`` (no score; the windows are integer work on the host, no factor ``d``): the sum of
      every image token of layer ``K-1`` into its window and the division of each kept state,
      ``(image tokens + kept tokens) * d``.
    """
    if n_query < 1:
        raise ValueError(f"n_query={n_query} is outside the allowed range [1, inf)")
    if schedule.ranker in _FREE_RANKERS or schedule.is_vanilla:
        return 0
    if schedule.ranker == "vision_cls":
        dv, t = dims.vision_hidden, dims.vision_tokens
        return dims.vision_crops * (dv * dv + t * dv * dv + t * dv)
    per_layer = schedule.tokens_per_layer(dims.n_image, dims.num_layers)
    d, total = dims.hidden, 0
    if schedule.ranker == "pool":
        return sum((per_layer[k - 1] + per_layer[k]) * d for k in schedule.boundaries)
    for k in schedule.boundaries:
        n_image = per_layer[k - 1]
        kv_len = dims.n_text + n_image
        rows = n_query + (n_image if schedule.ranker == "mean" else 0)
        total += rows * kv_len * d
        if schedule.rank_layer == "next":
            total += rows * d * d + kv_len * d * dims.kv_dim
        if schedule.ranker == "norope":
            total += 2 * (rows * d + kv_len * dims.kv_dim)
        elif schedule.ranker in ("nosink", "nosink_keep"):
            total += n_image * d
    return total


def vision_flops(dims: ModelDims) -> int:
    """Vision encoder + projector FLOPs per image (1 MAC = 1 FLOP); unaffected by dropping.

    Per crop: patch embedding ``patches * (3 p^2) * d_v`` plus ``vision_layers``
    ViT layers over ``vision_tokens`` (CLS included) by :func:`vision_layer_flops`;
    times ``vision_crops``. HF runs every vision layer even though LLaVA reads
    the features of the second-to-last one. Projector (2-layer MLP) on the patch
    features of every crop: ``crops * patches * (d_in * d_h + d_h * d)``.
    """
    patch_embed = dims.vision_patches * 3 * dims.vision_patch**2 * dims.vision_hidden
    encoder = dims.vision_layers * vision_layer_flops(dims.vision_tokens, dims.vision_hidden, dims.vision_ffn)
    projector = dims.vision_patches * (dims.projector_in * dims.projector_hidden + dims.projector_hidden * dims.hidden)
    return dims.vision_crops * (patch_embed + encoder + projector)


# -------------------------------------------------------------------- report
@dataclass(frozen=True)
class FlopsReport:
    """Every FLOPs figure of one schedule on one model, in FLOPs (1 MAC = 1 FLOP)."""

    model: str
    schedule: str
    stage_counts: tuple[int, ...]
    avg_image_tokens: float
    image_part: int
    full_sequence: int
    ranking: int
    vision: int
    vanilla_image_part: int
    vanilla_full_sequence: int
    convention: str

    @property
    def tflops(self) -> dict[str, float]:
        """The FLOPs fields in TFLOPs (1e12)."""
        names = ("image_part", "full_sequence", "ranking", "vision", "vanilla_image_part", "vanilla_full_sequence")
        return {name: getattr(self, name) / TERA for name in names}

    @property
    def image_part_ratio(self) -> float:
        """Image-part cost relative to the vanilla model (the paper's ratio)."""
        return self.image_part / self.vanilla_image_part if self.vanilla_image_part else math.nan

    @property
    def full_sequence_ratio(self) -> float:
        return self.full_sequence / self.vanilla_full_sequence

    @property
    def ranking_share(self) -> float:
        """Ranking overhead as a fraction of the full-sequence LM prefill of this schedule."""
        return self.ranking / self.full_sequence


def describe(schedule: DropSchedule) -> str:
    """``pdrop(layers=[8, 16, 24], lam=0.5; ranker=last, rank_layer=next)``."""
    params = ", ".join(f"{k}={v}" for k, v in schedule.params.items())
    if schedule.is_vanilla:
        return "vanilla"
    return f"{schedule.method}({params}; ranker={schedule.ranker}, rank_layer={schedule.rank_layer})"


def convention_text(convention: Convention) -> str:
    return (
        f"{_CONVENTION_TEXT[convention]}; image part = image tokens of the LM prefill only; "
        f"ViT layer 4nd^2 + 2n^2d + 2ndm"
    )


def flops_report(
    dims: ModelDims, schedule: DropSchedule, n_query: int = 1, *, convention: Convention = "eq4"
) -> FlopsReport:
    """All figures of :mod:`redundancy.flops` for ``schedule`` on ``dims``."""
    vanilla = DropSchedule.vanilla()
    return FlopsReport(
        model=dims.name,
        schedule=describe(schedule),
        stage_counts=schedule.stage_counts(dims.n_image),
        avg_image_tokens=schedule.average_tokens_per_layer(dims.n_image, dims.num_layers),
        image_part=image_part_flops(dims, schedule, convention=convention),
        full_sequence=full_sequence_flops(dims, schedule, convention=convention),
        ranking=ranking_flops(dims, schedule, n_query),
        vision=vision_flops(dims),
        vanilla_image_part=image_part_flops(dims, vanilla, convention=convention),
        vanilla_full_sequence=full_sequence_flops(dims, vanilla, convention=convention),
        convention=convention_text(convention),
    )


def format_report(report: FlopsReport, boundaries: Sequence[int] = ()) -> str:
    """A small labelled table, one figure per line."""
    t = report.tflops
    stages = " -> ".join(str(c) for c in report.stage_counts)
    if boundaries:
        stages += f"  (from layers {', '.join(str(b) for b in boundaries)})"
    rows = [
        ("preset", report.model),
        ("method", report.schedule),
        ("kept image tokens/stage", stages),
        ("avg image tokens/layer", f"{report.avg_image_tokens:.1f}"),
        ("image-part TFLOPs", f"{t['image_part']:.4f}  (paper convention, eq. 4 over image tokens)"),
        ("full-sequence TFLOPs", f"{t['full_sequence']:.4f}  (all prompt tokens, LM prefill)"),
        ("ranking overhead", f"{report.ranking / 1e9:.4f} GFLOPs  ({100 * report.ranking_share:.4f}% of full prefill)"),
        ("vision+projector TFLOPs", f"{t['vision']:.4f}  (per image, every crop and layer)"),
        ("convention", report.convention),
        ("ratio to vanilla", f"{report.image_part_ratio:.4f} image part, "
                             f"{report.full_sequence_ratio:.4f} full sequence"),
    ]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


# ------------------------------------------------------------ budget inverse
def _largest_within(candidates: Sequence[float], cost: Callable[[float], int], budget: float) -> float:
    """The last of ``candidates`` (sorted so that ``cost`` never decreases) with ``cost <= budget``,
    by bisection; the caller checks that the first candidate fits."""
    lo, hi = 0, len(candidates) - 1  # invariant: cost(candidates[lo]) <= budget
    if cost(candidates[hi]) <= budget:
        return candidates[hi]
    while hi - lo > 1:  # invariant: cost(candidates[hi]) > budget
        mid = (lo + hi) // 2
        if cost(candidates[mid]) <= budget:
            lo = mid
        else:
            hi = mid
    return candidates[lo]


def _check_budget(budget_tflops: float, lowest: int, highest: int, what: str) -> float:
    budget = float(budget_tflops) * TERA
    if not math.isfinite(budget) or budget < lowest:
        raise ValueError(
            f"budget={budget_tflops!r} TFLOPs is unreachable for {what}: the image-part cost ranges over "
            f"[{lowest / TERA:.4f}, {highest / TERA:.4f}] TFLOPs"
        )
    return budget


def fastv_ratio_for_budget(dims: ModelDims, budget_tflops: float, K: int = 2, **schedule_opts: Any) -> float:
    """FastV's drop fraction ``R`` (layer ``K`` fixed) with image-part cost <= ``budget_tflops``.

    Kept counts are floored, so the cost is a step function of ``R``; the answer
    is the smallest drop (most kept tokens) that fits, as the exact ratio
    ``R = 1 - k/N`` of its kept count ``k``. ValueError if even ``R = 1`` costs more.
    """
    n = dims.n_image

    def cost(keep: float) -> int:
        return image_part_flops(dims, DropSchedule.fastv(K=K, R=1.0 - keep, **schedule_opts))

    what = f"FastV K={K} on {dims.name}"
    budget = _check_budget(budget_tflops, cost(0.0), cost(1.0), what)
    keeps = [k / n for k in range(n + 1)] if n else [0.0, 1.0]
    return 1.0 - _largest_within(keeps, cost, budget)


def pdrop_lambda_for_budget(
    dims: ModelDims, budget_tflops: float, layers: Sequence[int] = (8, 16, 24), **opts: Any
) -> float:
    """PyramidDrop's ``lam`` (``layers`` fixed) with image-part cost <= ``budget_tflops``.

    The cost is a step function of ``lam`` that only changes where some stage
    count ``floor(lam^s N)`` does, i.e. at ``lam = (k/N)^(1/s)``. Bisection over
    those points returns the most expensive step that fits (the smallest drop),
    as its lower end: the ``lam`` at which its stage counts are first reached
    (the supremum of the feasible ``lam`` is the next step point, which does not
    fit). ValueError if even ``lam = 0`` costs more.
    """
    layers = tuple(layers)
    n = dims.n_image

    def cost(lam: float) -> int:
        return image_part_flops(dims, DropSchedule.pdrop(layers=layers, lam=lam, **opts))

    what = f"PyramidDrop layers={list(layers)} on {dims.name}"
    budget = _check_budget(budget_tflops, cost(0.0), cost(1.0), what)
    steps = {(k / n) ** (1.0 / s) for s in range(1, len(layers) + 1) for k in range(n + 1)} if n else set()
    return _largest_within(sorted(steps | {0.0, 1.0}), cost, budget)


# ----------------------------------------------------------------------- CLI
@dataclass
class FlopsConfig:
    """Schema of ``conf/flops/flops.yaml``; see that file for what each key means."""

    model: str = "llava-1.5-7b"
    method: Any = MISSING  # the `method` group (redundancy.schedule.MethodSpec)
    n_query: int = 1
    budget: float | None = None
    convention: str = "eq4"


ConfigStore.instance().store(name="flops_schema", node=FlopsConfig)


def _rank_opts(spec: MethodSpec) -> dict[str, Any]:
    """The spec's ranking options as the budget solvers take them; ``None`` leaves the method's default."""
    return {"ranker": spec.ranker, "rank_layer": spec.rank_layer, "positions": spec.positions}


def solve_budget(cfg: FlopsConfig, dims: ModelDims) -> tuple[FlopsConfig, str]:
    """``cfg`` with FastV's ``R`` or PyramidDrop's ``lam`` set to meet ``cfg.budget``, and a line saying so."""
    assert cfg.budget is not None
    head = f"budget {cfg.budget} TFLOPs (image part, {dims.name})"
    m = cfg.method
    if isinstance(m, (FastVSpec, PDropSpec)):  # a budget above the cost without dropping constrains nothing
        undropped = replace(m, R=0.0) if isinstance(m, FastVSpec) else replace(m, lam=1.0, ratios=None)
        whole = image_part_flops(dims, DropSchedule.from_spec(undropped))
        if cfg.budget * TERA > whole:
            raise ValueError(f"budget={cfg.budget} TFLOPs is unreachable: it is above the image-part cost without "
                             f"dropping ({whole / TERA:.4f} TFLOPs for {dims.name}); every setting meets it")
    if isinstance(m, FastVSpec):
        R = fastv_ratio_for_budget(dims, cfg.budget, K=m.K, **_rank_opts(m))
        return replace(cfg, method=replace(m, R=R)), f"{head} -> FastV K={m.K}: R={R:.6f}"
    if isinstance(m, PDropSpec):
        lam = pdrop_lambda_for_budget(dims, cfg.budget, layers=tuple(m.layers), **_rank_opts(m))
        note = f"{head} -> PyramidDrop layers={m.layers}: lam={lam:.6f}"
        return replace(cfg, method=replace(m, lam=lam, ratios=None)), note
    raise ValueError(f"budget={cfg.budget} applies to method=fastv or method=pdrop, not method={m.name!r}")


def run(cfg: FlopsConfig) -> str:
    """The text the command prints for ``cfg``: the budget answer (if asked) and the report."""
    if cfg.convention not in CONVENTIONS:
        raise ValueError(f"convention={cfg.convention!r} is unknown; choose one of {list(CONVENTIONS)}")
    dims = get_preset(cfg.model)
    DropSchedule.from_spec(cfg.method, dims.num_layers)  # every value checked before a budget is solved
    lines: list[str] = []
    if cfg.budget is not None:
        cfg, line = solve_budget(cfg, dims)
        lines.append(line)
    schedule = DropSchedule.from_spec(cfg.method, dims.num_layers)
    report = flops_report(dims, schedule, cfg.n_query, convention=cfg.convention)  # type: ignore[arg-type]
    lines.append(format_report(report, schedule.boundaries))
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="conf/flops", config_name="flops")
def main(cfg: DictConfig) -> None:
    run_entry(run, cfg)


if __name__ == "__main__":
    launch(main, "flops")
