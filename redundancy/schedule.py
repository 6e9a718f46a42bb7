"""Drop schedules: where image tokens are dropped and how many survive.

    from redundancy.schedule import DropSchedule
    DropSchedule.drop(layer=16, ratio=0.1)      # one point of the redundancy study
    DropSchedule.fastv(K=2, R=0.5)              # FastV
    DropSchedule.pdrop(layers=(8, 16, 24), lam=0.5)  # PyramidDrop
    DropSchedule.from_spec(PDropSpec(lam=0.4), model_depth=32)  # what `method=pdrop method.lam=0.4` means

Conventions (``docs/method.md`` sections 1-4):

* Layers are 0-indexed. A boundary ``K`` means layers ``0..K-1`` see every image
  token and layers ``K..L-1`` only the kept ones; valid boundaries are ``1..L-1``.
* Every ratio is relative to the *original* number of image tokens ``N`` of a
  sample; the tokens kept from boundary ``s`` on are ``floor(ratio_s * N)``
  (:func:`kept_count`, the one place that rounds).
* ``ranker``: ``last`` (attention of the last prompt token), ``instruction``
  (mean attention of the instruction tokens after the image), ``mean`` (FastV's
  paper: mean attention of every token from the first image token on), ``norope``
  (``last`` without rotary embedding on the query and keys), ``nosink`` /
  ``nosink_keep`` (``last`` with the image sink tokens, found by hidden-state norm,
  left out of the softmax and dropped / kept), ``vision_cls`` (the vision tower's
  [CLS] attention over the patches, LLaVA-1.5), ``debias`` (``last`` divided by the
  attention each image position receives on average over calibration images,
  :mod:`redundancy.priors`), and the controls ``random``, ``uniform`` (spatially even),
  ``pool`` (``uniform``'s tokens, each holding the mean of its window of the image grid)
  and ``inverse`` (lowest scores); docs/method.md section 3.
* ``rank_layer``: ``stage_last`` scores with the queries/keys of layer ``K-1``
  (the paper's definition); ``next`` applies layer ``K``'s input norm and q/k
  projections to the hidden states leaving layer ``K-1`` (official PyramidDrop code).
* ``positions``: ``keep`` (kept tokens keep their position ids, FastV) or
  ``compact`` (renumbered contiguously, official PyramidDrop code).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, get_args

Ranker = Literal[
    "last", "instruction", "mean", "norope", "nosink", "nosink_keep", "debias", "vision_cls", "random", "uniform",
    "pool", "inverse",
]
RankLayer = Literal["stage_last", "next"]
PositionPolicy = Literal["keep", "compact"]
Method = Literal["vanilla", "drop", "fastv", "pdrop", "custom"]

RANKERS: tuple[str, ...] = get_args(Ranker)
RANK_LAYERS: tuple[str, ...] = get_args(RankLayer)
POSITION_POLICIES: tuple[str, ...] = get_args(PositionPolicy)
METHODS: tuple[str, ...] = get_args(Method)
SEEDED_RANKERS: tuple[str, ...] = ("random",)  # rankers whose choice depends on the schedule's seed
# rankers that score by the attention of query rows over the keys of the ranking layer
ATTENTION_RANKERS: tuple[str, ...] = (
    "last", "instruction", "mean", "norope", "nosink", "nosink_keep", "debias", "inverse"
)

# floor(r * N) is evaluated with this slack so that a ratio typed as a decimal
# (0.29 * 100 = 28.999999999999996 in binary floating point) keeps the count its
# decimal value means (29). Only products within 1e-9 of an integer are affected.
_FLOOR_EPS = 1e-9


def kept_count(n_image: int, ratio: float) -> int:
    """Image tokens kept out of ``n_image`` at keep ratio ``ratio``: ``floor(ratio * n_image)``."""
    if n_image < 0:
        raise ValueError(f"n_image={n_image} must be >= 0")
    check_ratio(ratio)
    return min(n_image, math.floor(ratio * n_image + _FLOOR_EPS))


def derive_seed(checkpoint_id: str, boundaries: tuple[int, ...], ratios: tuple[float, ...], index: int) -> int:
    """The seed of draw ``index`` of a seeded ranker at one point: a 63-bit hash of the checkpoint's
    fingerprint, every boundary layer and its ratio and the index, so that two layers, two ratios,
    two checkpoints or two seed indices never share a random draw."""
    blob = json.dumps([checkpoint_id, list(boundaries), [float(r) for r in ratios], int(index)])
    return int.from_bytes(hashlib.blake2b(blob.encode(), digest_size=8).digest(), "little") & 0x7FFF_FFFF_FFFF_FFFF


def check_ratio(ratio: float, name: str = "ratio") -> None:
    if not isinstance(ratio, (int, float)) or not (0.0 <= float(ratio) <= 1.0) or math.isnan(ratio):
        raise ValueError(f"{name}={ratio!r} is outside the allowed range [0, 1]")


def _chosen(opts: dict[str, Any], **official: Any) -> dict[str, Any]:
    """A builder's options: those given over the method's official choices; ``None`` (a config
    left empty) means not given."""
    return {**official, **{k: v for k, v in opts.items() if v is not None}}


# ------------------------------------------------------------------ method specs
@dataclass
class MethodSpec:
    """Which method, with its parameters, as every command's ``method`` config group gives it
    (``method=pdrop method.lam=0.4``); :meth:`DropSchedule.from_spec` turns it into a schedule.
    ``None`` ranking options keep the method's official choice. Values are scalars, except on the
    sweep, which expands list values into a grid of scalar specs first."""

    name: str = "vanilla"  # the unmodified model (a ranker only says whose attention a trace records)
    ranker: Any = None  # null = the method's choice (last); see the module docstring
    rank_layer: Any = None  # null = the method's choice; stage_last | next
    positions: Any = None  # null = the method's choice; keep | compact
    seed: Any = 0  # the seed of a seeded ranker (random)


@dataclass
class DropSpec(MethodSpec):
    """Single-layer drop (the redundancy study): from ``layer`` on keep ``floor(ratio * N)`` image tokens."""

    name: str = "drop"
    layer: Any = 16  # 0-indexed: layers 0..layer-1 see every image token
    ratio: Any = 0.1  # keep ratio in [0, 1]


@dataclass
class FastVSpec(MethodSpec):
    """FastV: at layer ``K`` drop the fraction ``R`` of the image tokens (keep ratio ``1 - R``)."""

    name: str = "fastv"
    K: Any = 2
    R: Any = 0.5


@dataclass
class PDropSpec(MethodSpec):
    """PyramidDrop: stages split at ``layers``; stage ``s`` keeps ``floor(lam**s * N)`` image tokens
    (or ``ratios``, one per boundary, when given)."""

    name: str = "pdrop"
    layers: list[int] = field(default_factory=lambda: [8, 16, 24])
    lam: Any = 0.5
    ratios: Any = None


METHOD_SPECS: dict[str, type[MethodSpec]] = {"vanilla": MethodSpec, "drop": DropSpec, "fastv": FastVSpec,
                                             "pdrop": PDropSpec}


def _layer(value: Any, name: str, depth: int | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}={value!r} is not an integer layer index")
    high = f"{depth - 1}" if depth else "L-1"
    if value < 1 or (depth is not None and value > depth - 1):
        of = f" for a model with {depth} layers" if depth else ""
        raise ValueError(f"{name}={value}: boundary {value} is outside the allowed range [1, {high}]{of}")
    return value


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}={value!r} is not a number in the allowed range [0, 1]")
    check_ratio(float(value), name)
    return float(value)


@dataclass(frozen=True)
class DropSchedule:
    """An increasing list of boundaries, each with the fraction of the original
    image tokens kept from that layer on, plus how tokens are ranked and placed.

    An empty schedule (``method="vanilla"``) runs the unmodified model.
    """

    method: Method = "vanilla"
    boundaries: tuple[int, ...] = ()
    ratios: tuple[float, ...] = ()
    ranker: Ranker = "last"
    rank_layer: RankLayer = "stage_last"
    positions: PositionPolicy = "keep"
    seed: int = 0
    # The method's own parameters as the user gave them (K/R, lam, ...), for records.
    params: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "boundaries", tuple(int(b) for b in self.boundaries))
        object.__setattr__(self, "ratios", tuple(float(r) for r in self.ratios))
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is unknown; choose one of {list(METHODS)}")
        if self.ranker not in RANKERS:
            raise ValueError(f"ranker={self.ranker!r} is unknown; choose one of {list(RANKERS)}")
        if self.rank_layer not in RANK_LAYERS:
            raise ValueError(f"rank_layer={self.rank_layer!r} is unknown; choose one of {list(RANK_LAYERS)}")
        if self.positions not in POSITION_POLICIES:
            raise ValueError(f"positions={self.positions!r} is unknown; choose one of {list(POSITION_POLICIES)}")
        if len(self.boundaries) != len(self.ratios):
            raise ValueError(
                f"{len(self.boundaries)} boundaries {list(self.boundaries)} but "
                f"{len(self.ratios)} ratios {list(self.ratios)}: give one ratio per boundary"
            )
        for b in self.boundaries:
            if b < 1:
                raise ValueError(f"boundary {b} is outside the allowed range [1, L-1]")
        for a, b in zip(self.boundaries, self.boundaries[1:]):
            if b <= a:
                raise ValueError(f"boundaries must be strictly increasing, got {list(self.boundaries)}")
        for r in self.ratios:
            check_ratio(r)
        for earlier, later in zip(self.ratios, self.ratios[1:]):
            if later > earlier:
                raise ValueError(
                    f"ratios must not increase from stage to stage (dropped tokens do not come back), "
                    f"got {list(self.ratios)}"
                )

    # ----------------------------------------------------------------- builders
    @classmethod
    def vanilla(cls, **opts: Any) -> DropSchedule:
        return cls(method="vanilla", **_chosen(opts))

    @classmethod
    def drop(cls, layer: int, ratio: float, **opts: Any) -> DropSchedule:
        """Single-layer drop of the redundancy study: keep ``floor(ratio * N)`` from ``layer`` on."""
        check_ratio(ratio)
        return cls(method="drop", boundaries=(layer,), ratios=(ratio,), params={"layer": layer, "ratio": ratio},
                   **_chosen(opts, positions="keep"))

    @classmethod
    def fastv(cls, K: int = 2, R: float = 0.5, **opts: Any) -> DropSchedule:
        """FastV: at layer ``K`` drop the fraction ``R`` of the image tokens (keep ratio ``1 - R``).

        Defaults follow the official code: layer ``K-1`` attention of the last
        token, original position ids kept.
        """
        check_ratio(R, "R")
        return cls(method="fastv", boundaries=(K,), ratios=(1.0 - R,), params={"K": K, "R": R},
                   **_chosen(opts, ranker="last", rank_layer="stage_last", positions="keep"))

    @classmethod
    def pdrop(
        cls,
        layers: tuple[int, ...] | list[int] = (8, 16, 24),
        lam: float | None = 0.5,
        ratios: tuple[float, ...] | list[float] | None = None,
        **opts: Any,
    ) -> DropSchedule:
        """PyramidDrop: stage ``s`` (after boundary ``layers[s-1]``) keeps ``floor(lam**s * N)``.

        ``ratios`` (one per boundary, relative to the original ``N``) is the general
        form and overrides ``lam``. Defaults follow the official code: the next
        layer's q/k rank by the last instruction token, positions renumbered.
        """
        layers = tuple(layers)
        if ratios is None:
            if lam is None:
                raise ValueError("pdrop needs lam or an explicit ratio list")
            check_ratio(lam, "lam")
            ratios = tuple(lam ** (s + 1) for s in range(len(layers)))
            params: dict[str, Any] = {"layers": list(layers), "lam": lam}
        else:
            params = {"layers": list(layers), "ratios": list(ratios)}
        return cls(method="pdrop", boundaries=layers, ratios=tuple(ratios), params=params,
                   **_chosen(opts, ranker="last", rank_layer="next", positions="compact"))

    @classmethod
    def from_spec(cls, spec: MethodSpec, model_depth: int | None = None) -> DropSchedule:
        """The schedule ``spec`` names, every value checked (boundaries against ``model_depth``
        when known): the one place a method config becomes a schedule."""
        if METHOD_SPECS.get(spec.name) is not type(spec):
            raise ValueError(f"method.name={spec.name!r} does not match its spec {type(spec).__name__}; "
                             f"choose one of {list(METHOD_SPECS)}")
        opts = {"ranker": spec.ranker, "rank_layer": spec.rank_layer, "positions": spec.positions, "seed": spec.seed}
        if isinstance(spec, DropSpec):
            schedule = cls.drop(_layer(spec.layer, "layer", model_depth), _number(spec.ratio, "ratio"), **opts)
        elif isinstance(spec, FastVSpec):
            schedule = cls.fastv(_layer(spec.K, "K", model_depth), _number(spec.R, "R"), **opts)
        elif isinstance(spec, PDropSpec):
            layers = tuple(_layer(k, "layers", model_depth) for k in spec.layers)
            ratios = None if spec.ratios is None else [_number(r, "ratios") for r in spec.ratios]
            lam = None if spec.lam is None else _number(spec.lam, "lam")
            schedule = cls.pdrop(layers, lam, ratios, **opts)
        else:
            schedule = cls.vanilla(**opts)
        if model_depth is not None:
            schedule.validate_for(model_depth)
        return schedule

    # ------------------------------------------------------------------ queries
    @property
    def is_vanilla(self) -> bool:
        return not self.boundaries

    def seeded(self, checkpoint_id: str, index: int) -> DropSchedule:
        """This schedule as draw ``index`` of its seeded ranker on the checkpoint ``checkpoint_id``:
        the seed from :func:`derive_seed`, the index recorded as ``params["seed"]``. Schedules with an
        unseeded ranker (and vanilla) are returned unchanged."""
        if self.is_vanilla or self.ranker not in SEEDED_RANKERS:
            return self
        seed = derive_seed(checkpoint_id, self.boundaries, self.ratios, index)
        return replace(self, seed=seed, params={**self.params, "seed": int(index)})

    def validate_for(self, num_layers: int) -> None:
        """Raise if a boundary does not fit a language model of ``num_layers`` layers."""
        for b in self.boundaries:
            if not 1 <= b <= num_layers - 1:
                raise ValueError(
                    f"boundary {b} is outside the allowed range [1, {num_layers - 1}] "
                    f"for a language model with {num_layers} layers"
                )

    def stage_counts(self, n_image: int) -> tuple[int, ...]:
        """Image tokens present in each stage: ``(N, kept_1, kept_2, ...)``."""
        return (n_image, *(kept_count(n_image, r) for r in self.ratios))

    def tokens_per_layer(self, n_image: int, num_layers: int) -> list[int]:
        """Number of image tokens each of the ``num_layers`` decoder layers sees."""
        self.validate_for(num_layers)
        counts = self.stage_counts(n_image)
        starts = (0, *self.boundaries, num_layers)
        out: list[int] = []
        for s, count in enumerate(counts):
            out.extend([count] * (starts[s + 1] - starts[s]))
        return out

    def average_tokens_per_layer(self, n_image: int, num_layers: int) -> float:
        """The mean number of image tokens per decoder layer (the other way budgets get quoted)."""
        return sum(self.tokens_per_layer(n_image, num_layers)) / num_layers

    def record(self) -> dict[str, Any]:
        """Everything that identifies the schedule, for result rows."""
        out = asdict(self)
        out["boundaries"] = list(self.boundaries)
        out["ratios"] = list(self.ratios)
        return out
