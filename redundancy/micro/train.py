"""Train the micro-LLaVA on generated microvqa questions, vanilla or with PyramidDrop.

    python -m redundancy.micro.train method=vanilla out=checkpoints/micro-vanilla
    python -m redundancy.micro.train method=pdrop out=checkpoints/micro-pdrop \\
        init_from=checkpoints/micro-vanilla/stage-grow start_stage=final

One recipe for both variants: a curriculum of stages (``redundancy/conf/train/train.yaml``). The
early stages train a shallow model on easy questions and grow it to 32 layers
(:func:`redundancy.micro.model.grow`); stages marked ``drop: true`` run the forward
pass under the PyramidDrop schedule when ``method=pdrop`` (docs/method.md section 6).
Both variants can share the stages before the last (``init_from`` +
``start_stage``), as LLaVA variants share pretrained parts; the last stage's wall
time is then the like-for-like training cost.

Every sample is drawn fresh from the generator's train split (seeded per step,
so a resumed run sees the same data); accuracy is watched per family on a fixed
validation set. A checkpoint (``out/last``: model, processor, auxiliary head and
optimizer state in safetensors) is written every ``save_every`` steps and at the end of each stage
(``out/stage-<name>``); rerunning the command resumes from ``out/last``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import AutoProcessor, LlavaForConditionalGeneration

from redundancy.cli import launch, run_entry
from redundancy.engine import apply_schedule
from redundancy.loading import resolve_device
from redundancy.micro.microvqa import (
    ALL_SUBTYPES,
    FAMILIES,
    Example,
    GenConfig,
    Question,
    answer_vocabulary,
    generate,
    question_words,
)
from redundancy.micro.model import GROWTH, PROMPTS, MicroConfig, build_micro, format_prompt, grow, text_config
from redundancy.micro.model import build_model as build_micro_model
from redundancy.micro.packing import (
    EXTRA_EXCLUDED,
    TRAINING_ONLY,
    TRAINING_ONLY_SUBTYPES,
    collate_packed,
    extra_questions,
    packed_loss,
)
from redundancy.micro.patch_head import (
    PatchHead,
    check_targets,
    patch_accuracy,
    patch_labels,
    patch_loss,
    projected_features,
    vision_batch,
    vision_loss,
)
from redundancy.schedule import DropSchedule, MethodSpec
from redundancy.validate import check_device, check_threads, check_writable


@dataclass
class Stage:
    """One curriculum stage: model depth, data difficulty and optimiser settings."""

    name: str = "stage"
    kind: str = "vqa"  # vqa: answer questions | vision: dense per-patch targets (pretraining; see targets)
    steps: int = 100
    layers: int = 32  # grow the model to this depth at the start of the stage
    # how a stage that deepens the model fills the new layers (redundancy.micro.model.grow): identity
    # (the shipped recipes before v23: new layers start as the identity, and stay inert) | split
    # (every new layer a scaled copy of a trained one, so every layer starts working)
    growth: str = "identity"
    lr: float = 1e-3
    warmup: int = 50
    batch_size: int = 32
    drop: bool = False  # with method=pdrop, train this stage under the PyramidDrop schedule
    # llava: LLaVA-1.5's template | bare: ends on the question's last word (curriculum) |
    # mixed: even-indexed examples of each batch bare, odd ones LLaVA
    prompt: str = "llava"
    # Also supervise the answer at every LLaVA-prompt position from the question's last word
    # on ("<word> ? ASSISTANT :"): a training-only loss that builds the answering position's
    # fetch of the question one token at a time (experiments/log/micro_llava_training.md)
    suffix_loss: bool = False
    # Questions per image: the generator's question plus questions-1 others about the same scene,
    # packed into one sequence that keeps them from seeing each other (redundancy.micro.packing; a
    # training-only speed-up: the image's ~145 tokens are computed once, not once per question)
    questions: int = 1
    # Family weights of those extra questions (empty: ``families``); may also weigh the
    # training-only "side" and "shape" families (redundancy.micro.packing.TRAINING_ONLY). A dict, never None, so
    # that a command-line override (``stages.8.extras={reading:100.0}``) can fill it
    extras: dict[str, float] = field(default_factory=dict)
    extras_match: str = ""  # a regular expression every extra question must match ("": all)
    # subtypes never drawn as extras (default: counting one shape, whose answers are skewed on
    # generated scenes; redundancy.micro.packing); [] lets every subtype in
    extras_excluded: list[str] = field(default_factory=lambda: list(EXTRA_EXCLUDED))
    vision_lr_scale: float = 1.0  # the vision tower's learning rate relative to lr (0 freezes it, as LLaVA does)
    min_objects: int = 1
    max_objects: int = 6
    min_size: int = 12
    max_size: int = 36
    families: dict[str, float] = field(default_factory=lambda: {f: 1.0 for f in FAMILIES})
    # weights of the generator's subtypes within their family (redundancy.micro.microvqa.GenConfig;
    # e.g. {relation: 0.0} asks only neighbour questions of the spatial family); empty: even
    subtypes: dict[str, float] = field(default_factory=dict)
    # vqa stages: the auxiliary loss's targets (TrainConfig.aux_targets); empty: the run's. A
    # stage whose targets differ from the stage before it starts a fresh auxiliary head
    aux_targets: list[str] = field(default_factory=list)
    # vision stages: the per-patch targets (keys of redundancy.micro.microvqa.PATCH_TARGETS; colour first)
    targets: list[str] = field(default_factory=lambda: ["color", "shape", "glyph"])
    # vision stages: weight of a second loss term on the sparse targets (glyph, center) over
    # the patches that carry them only (0: off, as in the shipped recipe)
    sparse_weight: float = 0.0
    # vision stages: weight of the regression targets' loss (x, y: squared error of the
    # object centre, in units of the image side, over object patches)
    position_weight: float = 1.0


@dataclass
class TrainConfig:
    # the `method` group: vanilla | pdrop (stages with drop=true train under its schedule; PyramidDrop's
    # positions: null = the official code's compact, keep = the original ids, docs/method.md section 4)
    method: Any = field(default_factory=MethodSpec)
    out: str = "checkpoints/micro-vanilla"
    seed: int = 0
    model: MicroConfig = field(default_factory=MicroConfig)
    stages: list[Stage] = field(default_factory=list)
    init_from: str | None = None  # a model dir to start from (e.g. another run's stage-<name>)
    start_stage: str | None = None  # skip the stages before this one
    eval_every: int = 100
    eval_size: int = 512
    save_every: int = 200
    weight_decay: float = 0.0
    # An auxiliary loss in the vqa stages: the vision stage's per-patch targets, read by a
    # linear head off the same forward pass's projected image features, so that question
    # stages keep in the language model's input what the vision stage put there (glyphs,
    # centres, positions); weight 0 (default) turns it off. The head is not part of the model:
    # it is saved beside it in every checkpoint (aux_head.safetensors), and a resumed or
    # init_from run continues with it (a fresh one, seeded, only where the checkpoint has none).
    aux_weight: float = 0.0
    aux_targets: list[str] = field(default_factory=lambda: ["color", "shape", "glyph", "center", "x", "y"])
    aux_sparse_weight: float = 1.0
    aux_position_weight: float = 30.0
    threads: int = 0
    device: str = "auto"
    progress: bool = True  # progress bars (with ETA) over each stage's steps; false for logs


ConfigStore.instance().store(name="train_schema", node=TrainConfig)


# ---------------------------------------------------------------------- data
def gen_config(stage: Stage, shape: MicroConfig, seed: int) -> GenConfig:
    return GenConfig(
        image_size=shape.image_size,
        patch=shape.patch,
        min_objects=stage.min_objects,
        max_objects=stage.max_objects,
        min_size=stage.min_size,
        max_size=stage.max_size,
        families={f: w for f, w in stage.families.items() if w > 0},
        subtypes=dict(stage.subtypes),
        seed=seed,
    )


def draw(stage: Stage, shape: MicroConfig, seed: int, step: int, n: int, split: str = "train") -> list[Example]:
    """``n`` fresh examples for ``step`` (deterministic in seed, stage and step)."""
    stream = generate(gen_config(stage, shape, seed * 1_000_003 + step), split)
    return [next(stream) for _ in range(n)]


# A stage's prompt: one of redundancy.micro.model.PROMPTS, or mixed (half of each batch bare, half LLaVA).
STAGE_PROMPTS = (*PROMPTS, "mixed")


def _example_prompt(prompt: str, index: int) -> str:
    """The prompt of a batch's ``index``-th example: ``mixed`` alternates bare and LLaVA."""
    if prompt == "mixed":
        return "bare" if index % 2 == 0 else "llava"
    return prompt


def stage_batch(cfg: TrainConfig, si: int, step: int) -> tuple[list[Example], list[list[Question]] | None]:
    """The training examples of stage ``si`` at ``step`` and, for a packed stage
    (``questions > 1``), each example's extra questions: deterministic per seed, stage, step."""
    stage, shape = cfg.stages[si], cfg.model
    examples = draw(stage, shape, cfg.seed + 7919 * si, step, stage.batch_size)
    if stage.questions <= 1:
        return examples, None
    rng = np.random.default_rng([cfg.seed, si, step])
    weights = stage.extras or stage.families
    return examples, [extra_questions(e, stage.questions - 1, weights, shape.image_size, rng, stage.extras_match,
                                      stage.extras_excluded) for e in examples]


def collate(
    processor: Any, examples: list[Example], with_answers: bool, prompt: str = "llava"
) -> dict[str, torch.Tensor]:
    """Left-padded batch; with answers, labels supervise the answer word and ``</s>``."""
    texts = [format_prompt(e.question, _example_prompt(prompt, i)) for i, e in enumerate(examples)]
    if with_answers:
        texts = [f"{t} {e.answer} </s>" for t, e in zip(texts, examples)]
    images = [Image.fromarray(e.image) for e in examples]
    batch = processor(images=images, text=texts, return_tensors="pt", padding=True)
    if with_answers:
        labels = torch.full_like(batch["input_ids"], -100)
        labels[:, -2:] = batch["input_ids"][:, -2:]
        batch["labels"] = labels
    return dict(batch)


@torch.no_grad()
def first_token_accuracy(
    model: Any, processor: Any, examples: list[Example], batch_size: int = 64, prompt: str = "llava"
) -> dict[str, float]:
    """Held-out accuracy of the first answer token (answers are one word), per family."""
    model.eval()
    hits: dict[str, list[bool]] = {}
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        batch = collate(processor, chunk, with_answers=False, prompt=prompt)
        batch = {k: v.to(model.device) for k, v in batch.items()}
        pred = model(**batch, logits_to_keep=1).logits[:, -1].argmax(-1).tolist()
        words = processor.tokenizer.convert_ids_to_tokens(pred)
        for e, w in zip(chunk, words):
            hits.setdefault(e.family, []).append(w == e.answer)
    model.train()
    out = {f: float(np.mean(v)) for f, v in sorted(hits.items())}
    out["overall"] = float(np.mean([x for v in hits.values() for x in v]))
    return out


# -------------------------------------------------------------- checkpoints
AUX_FILE = "aux_head.safetensors"


def save_checkpoint(
    path: Path, model: Any, processor: Any, optimizer: torch.optim.Optimizer | None, state: dict,
    aux: PatchHead | None = None,
) -> None:
    """Model + processor (HF dir, safetensors), the auxiliary head (safetensors, beside the
    model: not part of it), optimizer tensors (safetensors) and progress (JSON), written to a
    temporary dir then renamed (a crash keeps the old one)."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    if aux is not None:
        save_file({k: v.detach().contiguous() for k, v in aux.state_dict().items()}, str(tmp / AUX_FILE),
                  metadata={"targets": ",".join(aux.targets)})
    if optimizer is not None:
        opt = optimizer.state_dict()
        tensors = {f"{i}.{k}": v for i, s in opt["state"].items() for k, v in s.items() if torch.is_tensor(v)}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "optimizer.safetensors"))
        state = {**state, "param_groups": opt["param_groups"]}
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def load_aux(path: Path, aux: PatchHead) -> bool:
    """Load the auxiliary head saved with a checkpoint into ``aux``; False (``aux`` left as it
    is) when the checkpoint has none or one for other targets."""
    file = path / AUX_FILE
    if not file.exists():
        return False
    with safe_open(str(file), framework="pt") as f:
        if (f.metadata() or {}).get("targets") != ",".join(aux.targets):
            return False
        aux.load_state_dict({k: f.get_tensor(k) for k in f.keys()})
    return True


def load_optimizer(path: Path, optimizer: torch.optim.Optimizer, state: dict) -> None:
    file = path / "optimizer.safetensors"
    if not file.exists():
        return
    flat = load_file(str(file))
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        idx, name = key.split(".", 1)
        per_param.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})


# ------------------------------------------------------------------ training
def vocabulary(shape: MicroConfig) -> set[str]:
    cfg = GenConfig(image_size=shape.image_size, patch=shape.patch)
    return {w for ws in answer_vocabulary(cfg).values() for w in ws} | set(question_words())


def lr_at(stage: Stage, step: int) -> float:
    """Linear warm-up, then cosine decay to 10% over the stage."""
    if step < stage.warmup:
        return stage.lr * (step + 1) / stage.warmup
    progress = (step - stage.warmup) / max(1, stage.steps - stage.warmup)
    return stage.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def build_optimizer(
    model: Any, head: PatchHead | None, stage: Stage, weight_decay: float
) -> tuple[torch.optim.Optimizer, list[torch.nn.Parameter]]:
    """AdamW over the model (and the pretraining head); the vision tower's group runs at
    ``vision_lr_scale`` of the stage's rate and is frozen at 0. Each group's ``scale``
    multiplies the scheduled rate."""
    tower = list(model.model.vision_tower.parameters())
    ids = set(map(id, tower))
    rest = [p for p in model.parameters() if id(p) not in ids] + (list(head.parameters()) if head else [])
    groups: list[dict[str, Any]] = [{"params": rest, "scale": 1.0}]
    if stage.vision_lr_scale > 0:
        groups.append({"params": tower, "scale": stage.vision_lr_scale})
    model.model.vision_tower.requires_grad_(stage.vision_lr_scale > 0)
    params = [p for g in groups for p in g["params"]]
    return torch.optim.AdamW(groups, lr=stage.lr, weight_decay=weight_decay), params


def suffix_length(processor: Any) -> int:
    """Tokens the LLaVA prompt adds after the question's last word (``? ASSISTANT :``)."""
    count = lambda p: len(processor.tokenizer(format_prompt("what color is the circle?", p)).input_ids)  # noqa: E731
    return count("llava") - count("bare")


def step_loss(
    model: Any,
    head: PatchHead | None,
    processor: Any,
    examples: list[Example],
    shape: MicroConfig,
    device: torch.device,
    prompt: str = "llava",
    suffix_loss: bool = False,
    extras: list[list[Question]] | None = None,
    aux: PatchHead | None = None,
    aux_weight: float = 0.0,
) -> torch.Tensor:
    """The training loss of one batch: per-patch targets (vision stage) or the answer tokens
    (with ``suffix_loss``, plus the answer's mean cross-entropy at the LLaVA-prompt positions
    from the question's last word up to the one before the answering position). With
    ``extras`` (more questions per example), the same loss over packed sequences. With ``aux``
    (a vqa stage), plus ``aux_weight`` x the per-patch loss of ``aux`` on the projected image
    features of the same forward pass (``TrainConfig.aux_weight``)."""
    if aux is not None and head is None:
        with projected_features(model) as seen:
            loss = step_loss(model, None, processor, examples, shape, device, prompt, suffix_loss, extras)
        (feats,) = seen  # [batch, patches, hidden]: one image per example
        labels = patch_labels(examples, shape, aux.targets).to(device)
        aux_loss = patch_loss(aux, aux.read(feats), labels, shape.image_size)
        return loss + aux_weight * aux_loss
    if head is not None:
        batch = vision_batch(processor, examples, shape, head.targets)
        return vision_loss(model, head, {k: v.to(device) for k, v in batch.items()})
    if extras is not None:
        packed = collate_packed(processor, examples, extras, prompt, n_image=shape.n_image)
        return packed_loss(model, packed, suffix_length(processor) if suffix_loss else 0)
    batch = {k: v.to(device) for k, v in collate(processor, examples, with_answers=True, prompt=prompt).items()}
    out = model(**batch)
    llava = [i for i in range(len(examples)) if _example_prompt(prompt, i) == "llava"]
    if not suffix_loss or not llava:
        return out.loss
    n = suffix_length(processor)  # answering position -3 (then answer, </s>): extra ones -3-n .. -4
    logp = out.logits[llava, -3 - n : -3].float().log_softmax(-1)
    answer = batch["input_ids"][llava, -2]
    return out.loss - logp.gather(-1, answer[:, None, None].expand(-1, n, 1)).mean()


def validate(
    model: Any,
    head: PatchHead | None,
    processor: Any,
    val: list[Example],
    shape: MicroConfig,
    device: torch.device,
    prompt: str = "llava",
) -> dict[str, dict[str, float]]:
    """``{"val_patch": per-target patch accuracy}`` in a vision stage, else ``{"val": first-token
    accuracy per family}`` with the LLaVA prompt, plus ``"val_bare"`` with the bare prompt
    when the stage trains with it (``bare`` or ``mixed``)."""
    if head is not None:
        batch = {k: v.to(device) for k, v in vision_batch(processor, val[:128], shape, head.targets).items()}
        return {"val_patch": patch_accuracy(model, head, batch)}
    out = {"val": first_token_accuracy(model, processor, val)}
    if prompt != "llava":  # bare or mixed: also the bare-prompt accuracy
        out["val_bare"] = first_token_accuracy(model, processor, val, prompt="bare")
    return out


def check_config(cfg: TrainConfig) -> None:
    """Everything about a training config that can fail, checked before any training."""
    check_threads(cfg.threads)
    check_device(cfg.device)
    check_writable(cfg.out, "out")
    if cfg.method.name not in ("vanilla", "pdrop"):
        raise ValueError(f"method={cfg.method.name!r} does not train; choose vanilla or pdrop")
    DropSchedule.from_spec(cfg.method, cfg.model.layers)  # every value checked before anything trains
    if not cfg.stages:
        raise ValueError("no training stages configured")
    names = [s.name for s in cfg.stages]
    for stage in cfg.stages:
        if stage.kind not in ("vqa", "vision"):
            raise ValueError(f"stage {stage.name!r}: kind={stage.kind!r} is unknown; choose vqa or vision")
        if stage.growth not in GROWTH:
            raise ValueError(f"stage {stage.name!r}: growth={stage.growth!r} is unknown; choose one of {GROWTH}")
        if stage.prompt not in STAGE_PROMPTS:
            raise ValueError(f"stage {stage.name!r}: prompt={stage.prompt!r} is unknown; choose one of {STAGE_PROMPTS}")
        if stage.kind == "vision":  # fail before training, not when the stage starts
            check_targets(stage.targets)
        if stage.questions < 1 or (stage.questions > 1 and (stage.kind == "vision" or stage.drop)):
            raise ValueError(f"stage {stage.name!r}: questions={stage.questions} must be 1, or > 1 in a vqa stage "
                             "without drop (PyramidDrop ranks by the one question's last token)")
        unknown = set(stage.families) - set(FAMILIES)
        if unknown:
            raise ValueError(f"stage {stage.name!r}: families {sorted(unknown)} are unknown; choose from {FAMILIES} "
                             f"(the training-only {sorted(TRAINING_ONLY)} questions are extras: "
                             "weigh them in `extras`)")
        if set(stage.extras) - {*FAMILIES, *TRAINING_ONLY}:
            raise ValueError(f"stage {stage.name!r}: extras {sorted(stage.extras)} must be among "
                             f"{[*FAMILIES, *TRAINING_ONLY]}")
        subtypes = {*ALL_SUBTYPES, *TRAINING_ONLY_SUBTYPES}
        if set(stage.extras_excluded) - subtypes:
            raise ValueError(f"stage {stage.name!r}: extras_excluded {stage.extras_excluded} must be among "
                             f"{sorted(subtypes)}")
        if (stage.extras or stage.extras_match) and stage.questions < 2:
            raise ValueError(f"stage {stage.name!r}: extras and extras_match need questions > 1")
        if stage.kind == "vqa":
            try:
                gen_config(stage, cfg.model, cfg.seed)
            except ValueError as err:
                raise ValueError(f"stage {stage.name!r}: {err}") from err
    if cfg.aux_weight > 0:
        check_targets(cfg.aux_targets)
        for stage in cfg.stages:
            if stage.aux_targets:
                check_targets(stage.aux_targets)
    if cfg.start_stage is not None and cfg.start_stage not in names:
        raise ValueError(f"start_stage={cfg.start_stage!r} is not one of the stages {names}")


def aux_head(model: Any, cfg: TrainConfig, targets: list[str], device: torch.device) -> PatchHead:
    """A fresh auxiliary head for ``targets`` (``TrainConfig.aux_weight``), seeded by the run's
    seed without touching the global random stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return PatchHead(model.config.text_config.hidden_size, targets, cfg.aux_sparse_weight,
                         cfg.aux_position_weight).to(device)


def run(cfg: TrainConfig) -> dict[str, Any]:
    check_config(cfg)
    schedule = DropSchedule.from_spec(cfg.method, cfg.model.layers)
    names = [s.name for s in cfg.stages]
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    last = out / "last"
    shape = cfg.model

    first = names.index(cfg.start_stage) if cfg.start_stage else 0
    progress: dict[str, Any] = {"stage": first, "step": 0, "wall_s": {}}
    if (last / "trainer_state.json").exists():
        progress.update(json.loads((last / "trainer_state.json").read_text()))
        model = LlavaForConditionalGeneration.from_pretrained(last)
        processor = AutoProcessor.from_pretrained(last)
        where = names[progress["stage"]] if progress["stage"] < len(names) else "done"
        print(f"resuming from {last}: stage {where}, step {progress['step']}", file=sys.stderr)
    elif cfg.init_from:
        model = LlavaForConditionalGeneration.from_pretrained(cfg.init_from)
        processor = AutoProcessor.from_pretrained(cfg.init_from)
        inherited = Path(cfg.init_from) / "trainer_state.json"
        if inherited.exists():  # another run's stage: keep the history of the stages skipped here
            before = json.loads(inherited.read_text())
            for key in ("wall_s", "final_loss"):
                progress[key] = {s: v for s, v in before.get(key, {}).items() if s in names[:first]}
    else:
        micro = dataclasses.replace(shape, layers=cfg.stages[0].layers)
        model, processor = build_micro(micro, vocabulary(shape), seed=cfg.seed)
    # HF's @wraps(Module.to) hides the bound self from mypy (typeshed's _Wrapped has no __get__)
    model.to(device).train()  # type: ignore[arg-type]
    val = draw(cfg.stages[-1], shape, cfg.seed, 0, cfg.eval_size, split="val")
    log_file = (out / "log.jsonl").open("a")
    # the auxiliary head (TrainConfig.aux_weight), made at the first vqa stage and wherever the targets change
    aux = None
    source = last if (last / "trainer_state.json").exists() else Path(cfg.init_from) if cfg.init_from else None

    for si in range(progress["stage"], len(cfg.stages)):
        stage = cfg.stages[si]
        if stage.layers > text_config(model).num_hidden_layers:
            micro = dataclasses.replace(shape, layers=stage.layers)
            deep = build_micro_model(micro, processor.tokenizer, seed=cfg.seed)
            model = grow(model, deep, stage.growth).to(device).train()  # type: ignore[arg-type]  # as above
        vision = stage.kind == "vision"
        head = None
        if vision:
            head = PatchHead(text_config(model).hidden_size, stage.targets, stage.sparse_weight,
                             stage.position_weight).to(device)
        targets = stage.aux_targets or cfg.aux_targets
        if cfg.aux_weight > 0 and not vision and (aux is None or aux.targets != targets):
            fresh = aux_head(model, cfg, targets, device)
            if aux is not None:
                print(f"stage {stage.name}: a fresh auxiliary head for {targets}", file=sys.stderr)
            elif source is not None and not load_aux(source, fresh):  # continue the checkpoint's head
                print(f"{source} has no auxiliary head for {targets}: a fresh one starts", file=sys.stderr)
            aux = fresh
        stage_aux = None if vision else aux  # the vision stage's own head already reads these targets
        optimizer, params = build_optimizer(model, head or stage_aux, stage, cfg.weight_decay)
        resumed = progress["stage"] == si and progress["step"] > 0 and not vision  # vision stages restart
        if resumed:
            load_optimizer(last, optimizer, progress)
        start_step = progress["step"] if resumed else 0
        use_drop = stage.drop and not schedule.is_vanilla
        ctx = apply_schedule(model, schedule, trace=False) if use_drop else contextlib.nullcontext()
        wall = progress["wall_s"].get(stage.name, 0.0)
        bar = tqdm(range(start_step, stage.steps),
                   desc=f"{stage.name} ({stage.layers}L{', pdrop' if use_drop else ''})",
                   initial=start_step, total=stage.steps, disable=not cfg.progress)
        loss_ema = progress.get("loss_ema") if resumed else None  # a stage resumed at its end keeps its loss
        with ctx:
            for step in bar:
                t0 = time.perf_counter()
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(stage, step) * group["scale"]
                examples, extras = stage_batch(cfg, si, step)
                loss = step_loss(model, head, processor, examples, shape, device, stage.prompt, stage.suffix_loss,
                                 extras, stage_aux, cfg.aux_weight)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                wall += time.perf_counter() - t0
                loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
                record: dict[str, Any] = {"stage": stage.name, "step": step + 1, "loss": loss.item(), "wall_s": wall}
                if (step + 1) % cfg.eval_every == 0 or step + 1 == stage.steps:
                    accuracies = validate(model, head, processor, val, shape, device, stage.prompt)
                    record.update(accuracies)
                    shown = accuracies.get(f"val_{stage.prompt}", next(iter(accuracies.values())))
                    bar.set_postfix(loss=f"{loss_ema:.3f}", **{k: f"{v:.3f}" for k, v in shown.items()})
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                progress.update(stage=si, step=step + 1, loss_ema=loss_ema)
                progress["wall_s"][stage.name] = wall
                if (step + 1) % cfg.save_every == 0 and step + 1 < stage.steps and head is None:
                    save_checkpoint(last, model, processor, optimizer, progress, aux)
        progress.update(stage=si + 1, step=0)
        progress["wall_s"][stage.name] = wall
        progress.setdefault("final_loss", {})[stage.name] = loss_ema
        save_checkpoint(out / f"stage-{stage.name}", model, processor, None, progress, aux)
        save_checkpoint(last, model, processor, None, progress, aux)
    log_file.close()
    summary = {"method": cfg.method.name, "wall_s": progress["wall_s"], "final_loss": progress.get("final_loss", {}),
               "val": first_token_accuracy(model, processor, val), "device": str(device),
               "threads": torch.get_num_threads()}
    (out / "train_summary.json").write_text(json.dumps(summary, indent=1))
    return summary


@hydra.main(version_base=None, config_path="../conf/train", config_name="train")
def main(cfg: DictConfig) -> None:
    run_entry(lambda typed: json.dumps(run(typed), indent=1), cfg)


if __name__ == "__main__":
    launch(main, "train", check=check_config)
