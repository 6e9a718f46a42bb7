"""The micro-LLaVA builder and the training recipe on tiny shapes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from redundancy.cli import CONF as CONF_ROOT
from redundancy.loading import SHIPPED
from redundancy.micro.export import trained_method
from redundancy.micro.microvqa import PATCH_TARGETS
from redundancy.micro.model import MicroConfig, build_micro, build_model, grow, grow_sources, shrink
from redundancy.micro.patch_head import PatchHead, vision_batch, vision_loss
from redundancy.micro.train import (
    Stage,
    TrainConfig,
    check_config,
    collate,
    draw,
    run,
    stage_batch,
    step_loss,
    vocabulary,
)
from redundancy.schedule import DropSchedule, FastVSpec, MethodSpec, PDropSpec

SHAPE = MicroConfig(layers=4, hidden=32, heads=2, kv_heads=2, ffn=64, image_size=48, patch=8,
                   vision_layers=1, vision_hidden=32, vision_heads=2, vision_ffn=64)
EASY = dict(
    max_objects=2, min_size=16, max_size=24, families={"color": 1.0, "count": 1.0, "reading": 0.0, "spatial": 0.0}
)


def _micro(layers: int) -> MicroConfig:
    return dataclasses.replace(SHAPE, layers=layers)


def test_micro_saves_and_loads_offline(tmp_path: Path) -> None:
    model, processor = build_micro(_micro(4), vocabulary(SHAPE))
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path)
    proc = AutoProcessor.from_pretrained(tmp_path)
    batch = collate(proc, draw(Stage(**EASY), SHAPE, 0, 0, 3), with_answers=False)
    n_img = (batch["input_ids"] == loaded.config.image_token_id).sum(1)
    assert n_img.tolist() == [36, 36, 36]  # (48 / 8)^2
    assert proc.tokenizer.convert_tokens_to_ids("<unk>") not in batch["input_ids"][batch["attention_mask"].bool()]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model.eval()(**batch).logits)


def test_collate_supervises_answer_and_eos() -> None:
    _, processor = build_micro(_micro(2), vocabulary(SHAPE))
    examples = draw(Stage(**EASY), SHAPE, 0, 0, 4)
    batch = collate(processor, examples, with_answers=True)
    labels = batch["labels"]
    assert ((labels != -100).sum(1) == 2).all()
    answers = processor.tokenizer.convert_ids_to_tokens(labels[:, -2].tolist())
    assert answers == [e.answer for e in examples]
    assert (labels[:, -1] == processor.tokenizer.eos_token_id).all()


def test_bare_prompt_ends_on_the_question_word() -> None:
    _, processor = build_micro(_micro(2), vocabulary(SHAPE))
    examples = [e for e in draw(Stage(**EASY), SHAPE, 0, 0, 8) if e.family == "color"][:2]
    assert examples
    batch = collate(processor, examples, with_answers=True, prompt="bare")
    tokens = [processor.tokenizer.convert_ids_to_tokens(row) for row in batch["input_ids"].tolist()]
    for e, row in zip(examples, tokens):
        # ... "what color is the <shape>" <answer> </s>: no "?", no "ASSISTANT:"
        assert row[-3] == e.question.rstrip("?").split()[-1].lower()
        assert row[-2] == e.answer and "assistant" not in row and "?" not in row
    llava = collate(processor, examples, with_answers=True)
    assert processor.tokenizer.convert_ids_to_tokens(llava["input_ids"][0, -5:-2].tolist()) == ["?", "assistant", ":"]
    with pytest.raises(ValueError, match="prompt"):
        collate(processor, examples, with_answers=False, prompt="chatml")


def test_mixed_prompt_alternates_bare_and_llava() -> None:
    _, processor = build_micro(_micro(2), vocabulary(SHAPE))
    examples = draw(Stage(**EASY), SHAPE, 0, 0, 4)
    mixed = collate(processor, examples, with_answers=True, prompt="mixed")
    for i, e in enumerate(examples):
        own = collate(processor, [e], with_answers=True, prompt="bare" if i % 2 == 0 else "llava")
        n = int(mixed["attention_mask"][i].sum())  # left padding: compare the unpadded tails
        assert mixed["input_ids"][i, -n:].tolist() == own["input_ids"][0].tolist()
        assert mixed["labels"][i, -n:].tolist() == own["labels"][0].tolist()


def test_suffix_loss_supervises_the_answer_from_the_question_word_on() -> None:
    model, processor = build_micro(_micro(2), vocabulary(SHAPE), seed=3)
    for p in model.parameters():  # away from the zero initialisation: distinct logits per position
        torch.nn.init.normal_(p, std=0.05)
    examples = draw(Stage(**EASY), SHAPE, 0, 0, 4)
    cpu = torch.device("cpu")
    plain = step_loss(model, None, processor, examples, SHAPE, cpu)
    with torch.no_grad():
        # Independently: one example at a time, the answer's cross-entropy at "<word> ? assistant".
        extra = []
        for e in examples:
            batch = collate(processor, [e], with_answers=True)
            tokens = processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())
            assert tokens[-5:-2] == ["?", "assistant", ":"]
            logp = model(**batch).logits[0].log_softmax(-1)
            answer = batch["input_ids"][0, -2]
            extra += [-logp[pos, answer] for pos in (-6, -5, -4)]
        expected = plain + torch.stack(extra).mean()
        torch.testing.assert_close(step_loss(model, None, processor, examples, SHAPE, cpu, "llava", True), expected)
        # Bare prompts end on the word (already the answering position): nothing is added.
        torch.testing.assert_close(step_loss(model, None, processor, examples, SHAPE, cpu, "bare", True),
                                   step_loss(model, None, processor, examples, SHAPE, cpu, "bare"))


def test_aux_loss_adds_the_patch_targets_of_the_same_images() -> None:
    model, processor = build_micro(_micro(2), vocabulary(SHAPE), seed=3)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    head = PatchHead(SHAPE.hidden, ["color", "shape", "glyph", "center", "x", "y"], sparse_weight=1.0,
                     position_weight=30.0)
    examples = draw(Stage(**EASY), SHAPE, 0, 0, 4)
    cpu = torch.device("cpu")
    with torch.no_grad():
        # Independently: the vision stage's loss, on a forward pass of the images alone.
        patches = vision_loss(model, head, vision_batch(processor, examples, SHAPE, head.targets))
        assert patches > 0
        for prompt, suffix, extras in (("llava", False, None), ("mixed", True, None),
                                       ("llava", True, [[] for _ in examples])):  # the packed path
            plain = step_loss(model, None, processor, examples, SHAPE, cpu, prompt, suffix, extras)
            both = step_loss(model, None, processor, examples, SHAPE, cpu, prompt, suffix, extras, head, 0.5)
            torch.testing.assert_close(both, plain + 0.5 * patches)
    # The auxiliary term reaches the projector through the question stage's own forward pass.
    step_loss(model, None, processor, examples, SHAPE, cpu, "llava", False, None, head, 1.0).backward()
    assert head.proj.weight.grad is not None and head.proj.weight.grad.abs().sum() > 0
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0


CONF = CONF_ROOT / "train"  # the shipped recipe (train.yaml) and the configs it builds on
EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments" / "conf"  # past probes


def _compose(*names: str) -> list[TrainConfig]:
    """The training configs ``redundancy/conf/train/<name>.yaml`` (or a past probe's
    ``experiments/conf/<name>.yaml``), composed as ``python -m redundancy.micro.train --config-name <name>``
    (with ``--config-dir experiments/conf`` for a probe) does."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    out = []
    for name in names:
        probe = not (CONF / f"{name}.yaml").exists()
        overrides = [f"hydra.searchpath=[file://{CONF}]"] if probe else []
        with initialize_config_dir(config_dir=str(EXPERIMENTS if probe else CONF), version_base=None):
            out.append(OmegaConf.to_object(compose(config_name=name, overrides=overrides)))
    return out


def test_default_training_config_is_the_shipped_recipe() -> None:
    """``python -m redundancy.micro.train`` with no --config-name trains the shipped checkpoints' recipe:
    their cards' stages, auxiliary loss and (``method=pdrop``) PyramidDrop schedule (issue 31)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        default, twin = (OmegaConf.to_object(compose(config_name="train", overrides=o)) for o in ([], ["method=pdrop"]))
    assert default.method == MethodSpec(positions="keep") and twin.method == PDropSpec(positions="keep")
    for name, cfg in (("micro-llava-vanilla", default), ("micro-llava-pdrop", twin)):
        shipped = json.loads((SHIPPED / name / "card.json").read_text())["train_config"]
        assert [s.name for s in cfg.stages] == [s["name"] for s in shipped["stages"]], name
        assert cfg.aux_weight == shipped["aux_weight"] > 0 and cfg.aux_targets == shipped["aux_targets"]
        # the cards predate the method group: the schedule their keys name
        assert DropSchedule.from_spec(cfg.method) == DropSchedule.from_spec(trained_method(shipped)), name


def test_binding_curriculum_config() -> None:
    """conf/train/bind.yaml: base.yaml's settings, bare-prompt stages before LLaVA-prompt ones,
    and the last stage (the one that differs between the variants) on the LLaVA prompt."""
    base, bind = _compose("base", "bind")
    assert isinstance(bind, TrainConfig) and bind.model == base.model and bind.method == base.method
    prompts = [s.prompt for s in bind.stages if s.kind == "vqa"]
    assert prompts[0] == "bare" and prompts[-1] == "llava" and bind.stages[-1].drop
    assert all(s.prompt == "llava" for s in base.stages)


def test_spatial_curriculum_config() -> None:
    """conf/train/spatial.yaml: bind.yaml's model and variants; the object-centre targets are
    learnt before any question, the side questions come before the relations they lead to, and
    both before the reading stages (which must not be what the spatial chain overwrites last)."""
    bind, spatial = _compose("bind", "spatial")
    assert isinstance(spatial, TrainConfig) and spatial.model == bind.model and spatial.method == bind.method
    names = [s.name for s in spatial.stages]
    first_vqa = next(i for i, s in enumerate(spatial.stages) if s.kind == "vqa")
    assert any({"x", "y"} <= set(s.targets) for s in spatial.stages[:first_vqa])
    sided = [i for i, s in enumerate(spatial.stages) if s.extras and "side" in s.extras]
    related = [i for i, s in enumerate(spatial.stages) if s.extras and s.extras.get("spatial")]
    assert sided and related and sided[0] < related[0] < names.index("read")
    assert all(spatial.stages[i].questions > 1 for i in sided)
    assert spatial.stages[-1].drop and spatial.stages[-1].prompt == "llava" and spatial.stages[-1].layers == 32


def test_aux_curriculum_config() -> None:
    """conf/train/train.yaml (the shipped recipe): spatial.yaml's model, variants and vision stages, plus the auxiliary
    loss; the reading stage and the first every-family stages after the spatial chain replay the
    relations that reading would otherwise overwrite; the last stage is still the one the
    variants differ in."""
    spatial, aux = _compose("spatial", "train")
    assert aux.model == spatial.model and aux.method.name == spatial.method.name == "vanilla"
    assert aux.aux_weight > 0 and spatial.aux_weight == 0
    # the PyramidDrop variant trains with original position ids; the older recipes as they ran
    assert aux.method.positions == "keep" and spatial.method.positions is None
    stages = {s.name: s for s in aux.stages}
    for name in ("read", "all", "all2"):  # reading overwrote the relations here (session 13)
        stage = stages[name]
        assert stage.questions > 1 and stage.extras.get("spatial") and "side" in stage.extras, name
        assert list(stages).index(name) > list(stages).index("relation_both"), name
    assert aux.stages[-1].drop and aux.stages[-1].layers == 32 and aux.stages[-1].prompt == "llava"
    # growth in doublings by split copies (issue 26: identity growth left 28 of 32 layers inert)
    depths = [s.layers for s in aux.stages]
    grown = [s for s, before in zip(aux.stages[1:], depths) if s.layers > before]
    assert [s.layers for s in grown] == [8, 16, 32] and all(s.growth == "split" for s in grown)
    # every full-depth stage is one the variants differ in (PyramidDrop all through full depth)
    assert all(s.drop for s in aux.stages if s.layers == 32)
    assert [s for s in aux.stages if s.kind == "vision"] == [s for s in spatial.stages if s.kind == "vision"]


def test_every_training_config_composes() -> None:
    """Every training config (the recipe in redundancy/conf/train/, the past probes in experiments/conf/)
    is a valid TrainConfig."""
    from redundancy.micro.train import check_config

    names = sorted(p.stem for p in [*CONF.glob("*.yaml"), *EXPERIMENTS.glob("train*.yaml")])
    assert {"base", "bind", "spatial", "train", "train_position", "train_relation", "train_targets"} <= set(names)
    for name, cfg in zip(names, _compose(*names)):
        assert isinstance(cfg, TrainConfig) and cfg.stages, name
        assert all(stage.kind in ("vqa", "vision") for stage in cfg.stages), name
        check_config(cfg)  # kinds, prompts, vision targets, start stage: what run() checks first


def test_stage_batch_is_deterministic_and_packs_only_packed_stages() -> None:
    packed = Stage(name="packed", questions=3, batch_size=4, extras={"color": 1.0}, extras_match="^What color", **EASY)
    cfg = TrainConfig(model=SHAPE, stages=[Stage(name="plain", batch_size=4, **EASY), packed])
    examples, extras = stage_batch(cfg, 0, 5)
    assert extras is None and len(examples) == 4
    examples, extras = stage_batch(cfg, 1, 5)
    again, extras_again = stage_batch(cfg, 1, 5)
    assert [e.question for e in examples] == [e.question for e in again] and extras == extras_again
    assert extras is not None and all(len(qs) <= 2 for qs in extras)
    assert all(q.question.startswith("What color") for qs in extras for q in qs)
    assert any(qs for qs in extras)
    other, _ = stage_batch(cfg, 1, 6)
    assert [e.question for e in other] != [e.question for e in examples]


def test_grow_keeps_the_function() -> None:
    shallow, processor = build_micro(_micro(2), vocabulary(SHAPE), seed=1)
    for p in shallow.parameters():  # leave the zero initialisation: make every layer do something
        torch.nn.init.normal_(p, std=0.05)
    deep = grow(shallow, build_model(_micro(8), processor.tokenizer, seed=2))
    batch = collate(processor, draw(Stage(**EASY), SHAPE, 0, 0, 2), with_answers=False)
    with torch.no_grad():
        torch.testing.assert_close(deep.eval()(**batch).logits, shallow.eval()(**batch).logits)
    with pytest.raises(ValueError, match="not a multiple"):
        grow(shallow, build_model(_micro(5), processor.tokenizer))


def test_split_growth_sources_keep_layer_zero_alone() -> None:
    assert grow_sources(4, 32) == [0] + [1] * 15 + [2] * 8 + [3] * 8
    assert grow_sources(4, 8) == [0, 1, 1, 1, 2, 2, 3, 3]
    assert grow_sources(8, 16) == [0, 1, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7]
    with pytest.raises(ValueError, match="not a multiple"):
        grow_sources(4, 30)


def test_split_growth_makes_every_layer_a_scaled_copy_and_keeps_the_function_to_first_order() -> None:
    shallow, processor = build_micro(_micro(2), vocabulary(SHAPE), seed=1)
    for p in shallow.parameters():
        torch.nn.init.normal_(p, std=0.05)
    batch = collate(processor, draw(Stage(**EASY), SHAPE, 0, 0, 2), with_answers=False)
    split = grow(shallow, build_model(_micro(8), processor.tokenizer, seed=2), "split")
    identity = grow(shallow, build_model(_micro(8), processor.tokenizer, seed=2), "identity")
    src, deep = shallow.model.language_model.layers, split.model.language_model.layers
    for j, i in enumerate(grow_sources(2, 8)):
        copies = grow_sources(2, 8).count(i)
        torch.testing.assert_close(deep[j].self_attn.q_proj.weight, src[i].self_attn.q_proj.weight)
        torch.testing.assert_close(deep[j].mlp.down_proj.weight, src[i].mlp.down_proj.weight / copies)
        torch.testing.assert_close(deep[j].self_attn.o_proj.weight, src[i].self_attn.o_proj.weight / copies)
    # identity growth leaves 6 of 8 layers with zero residual outputs; split growth none
    assert sum(bool(layer.mlp.down_proj.weight.abs().sum() == 0) for layer in identity.model.language_model.layers) == 6
    assert all(layer.mlp.down_proj.weight.abs().sum() > 0 for layer in deep)
    with torch.no_grad():
        want = shallow.eval()(**batch).logits
        got = split.eval()(**batch).logits
    # the copies add up to the shallow layer's update to first order (small updates here)
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    with pytest.raises(ValueError, match="growth 'stack' is unknown"):
        grow(shallow, build_model(_micro(8), processor.tokenizer), "stack")


def test_shrink_undoes_identity_growth() -> None:
    shallow, processor = build_micro(_micro(2), vocabulary(SHAPE), seed=1)
    for p in shallow.parameters():
        torch.nn.init.normal_(p, std=0.05)
    batch = collate(processor, draw(Stage(**EASY), SHAPE, 0, 0, 2), with_answers=False)
    small = shrink(grow(shallow, build_model(_micro(8), processor.tokenizer, seed=2)), [0, 4])
    assert small.config.text_config.num_hidden_layers == 2
    with torch.no_grad():
        torch.testing.assert_close(small.eval()(**batch).logits, shallow.eval()(**batch).logits)


def test_unknown_growth_fails_before_training(tmp_path: Path) -> None:
    cfg = TrainConfig(out=str(tmp_path), model=SHAPE, stages=[Stage(layers=8, growth="stack", **EASY)])
    with pytest.raises(ValueError, match="growth='stack' is unknown"):
        check_config(cfg)


@pytest.mark.parametrize("method", ["vanilla", "pdrop"])
def test_tiny_training_lowers_the_loss_and_resumes(tmp_path: Path, method: str) -> None:
    spec = PDropSpec(layers=[1, 2, 3], lam=0.5) if method == "pdrop" else MethodSpec()
    cfg = TrainConfig(method=spec, out=str(tmp_path / method), model=SHAPE,
                      stages=[Stage(name="s", steps=40, layers=4, lr=3e-3, warmup=5, batch_size=16, drop=True, **EASY)],
                      eval_every=20, eval_size=32, save_every=10)
    summary = run(cfg)
    log = [json.loads(line) for line in (tmp_path / method / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log]
    assert len(losses) == 40
    assert sum(losses[-8:]) / 8 < 0.7 * sum(losses[:8]) / 8
    assert summary["method"] == method and summary["wall_s"]["s"] > 0
    assert (tmp_path / method / "stage-s" / "model.safetensors").exists()
    # A rerun of a finished run resumes at the end and trains nothing more.
    again = run(cfg)
    assert len((tmp_path / method / "log.jsonl").read_text().splitlines()) == 40
    assert again["wall_s"] == summary["wall_s"]
    # A run that starts from this run's stage keeps the skipped stage's history (wall time, loss).
    # (with the auxiliary patch-target loss in the new stage)
    follow = run(dataclasses.replace(
        cfg, out=str(tmp_path / "next"), init_from=str(tmp_path / method / "stage-s"), start_stage="t", aux_weight=0.5,
        stages=[cfg.stages[0], dataclasses.replace(cfg.stages[0], name="t", steps=2)]))
    assert follow["wall_s"]["s"] == summary["wall_s"]["s"] and follow["wall_s"]["t"] > 0
    assert follow["final_loss"]["s"] == summary["final_loss"]["s"]


def test_the_auxiliary_head_travels_with_the_checkpoint(tmp_path: Path) -> None:
    """A run started from another run's stage (init_from), as the PyramidDrop final stage is,
    continues with that run's auxiliary head, not a fresh one (a fresh head's loss is ~100x the
    trained one's and its gradients reach the projector)."""
    from safetensors.torch import load_file

    stage = Stage(name="s", steps=3, layers=2, lr=3e-3, warmup=1, batch_size=4, **EASY)
    cfg = TrainConfig(out=str(tmp_path / "a"), model=SHAPE, stages=[stage], eval_every=100, eval_size=8,
                      aux_weight=0.5, seed=3)
    run(cfg)
    trained = load_file(str(tmp_path / "a" / "stage-s" / "aux_head.safetensors"))
    still = dataclasses.replace(stage, name="t", steps=1, lr=0.0)  # lr 0: the head must come out as it went in
    run(dataclasses.replace(cfg, out=str(tmp_path / "b"), init_from=str(tmp_path / "a" / "stage-s"),
                            start_stage="t", stages=[stage, still]))
    continued = load_file(str(tmp_path / "b" / "stage-t" / "aux_head.safetensors"))
    assert trained.keys() == continued.keys()
    for key in trained:
        torch.testing.assert_close(continued[key], trained[key])
    # A fresh head (what a checkpoint without one gives) is not the trained head.
    fresh = PatchHead(SHAPE.hidden, cfg.aux_targets).state_dict()
    assert not torch.equal(fresh["proj.weight"], trained["proj.weight"])


def test_a_stage_with_its_own_auxiliary_targets_gets_its_own_head(tmp_path: Path) -> None:
    """Stage.aux_targets: a stage whose targets differ from the run's trains a fresh head on
    them (saved with its checkpoint); a stage after it with the run's targets gets one again."""
    from safetensors import safe_open

    edges = ["color", "shape", "edge_left", "edge_right", "edge_above", "edge_below"]
    stage = Stage(name="s", steps=2, layers=2, lr=3e-3, warmup=1, batch_size=4, **EASY)
    stages = [stage, dataclasses.replace(stage, name="t", aux_targets=edges), dataclasses.replace(stage, name="u")]
    cfg = TrainConfig(out=str(tmp_path), model=SHAPE, stages=stages, eval_every=100, eval_size=8, aux_weight=0.5)
    run(cfg)
    for name, targets in (("s", cfg.aux_targets), ("t", edges), ("u", cfg.aux_targets)):
        with safe_open(str(tmp_path / f"stage-{name}" / "aux_head.safetensors"), "pt") as f:
            assert f.metadata()["targets"] == ",".join(targets)
            assert f.get_tensor("proj.weight").shape[0] == sum(PATCH_TARGETS[t] for t in targets)
    with pytest.raises(ValueError, match="vision targets"):
        check_config(dataclasses.replace(cfg, stages=[dataclasses.replace(stage, aux_targets=["shape"])]))


def test_a_stage_shortened_on_resume_keeps_its_loss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash after the step-10 save; resumed with the stage cut to 10 steps, the stage ends at
    once and still records its final loss (the running mean saved with the checkpoint)."""
    import redundancy.micro.train as train

    calls = {"n": 0}
    real = train.step_loss

    def crash_at_13(*args: object, **kwargs: object) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 13:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    stage = Stage(name="s", steps=20, layers=2, lr=3e-3, warmup=2, batch_size=4, **EASY)
    cfg = TrainConfig(out=str(tmp_path), model=SHAPE, stages=[stage], eval_every=100, eval_size=8, save_every=10)
    monkeypatch.setattr(train, "step_loss", crash_at_13)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    monkeypatch.setattr(train, "step_loss", real)
    state = json.loads((tmp_path / "last" / "trainer_state.json").read_text())
    assert state["step"] == 10 and state["loss_ema"] > 0
    summary = run(dataclasses.replace(cfg, stages=[dataclasses.replace(stage, steps=10)]))
    assert summary["final_loss"]["s"] == state["loss_ema"]


def test_pdrop_training_is_cheaper_per_step(tmp_path: Path) -> None:
    """The drop schedule really runs in training: fewer tokens after the boundaries."""
    from redundancy.engine import apply_schedule
    from redundancy.schedule import DropSchedule

    model, processor = build_micro(_micro(4), vocabulary(SHAPE))
    batch = collate(processor, draw(Stage(**EASY), SHAPE, 0, 0, 4), with_answers=True)
    with apply_schedule(model.train(), DropSchedule.pdrop(layers=(1, 2, 3), lam=0.5)) as trace:
        model(**batch).loss.backward()
    assert trace.kept_counts()[0] == [36, 18, 9, 4]


@pytest.mark.parametrize("positions", [None, "keep"])
def test_pdrop_training_uses_the_configured_position_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, positions: str | None
) -> None:
    """``method.positions`` reaches the schedule the drop stages train under (default: the
    official code's ``compact``); the run's config.json records it."""
    import redundancy.micro.train as train

    seen = []
    real = train.apply_schedule

    def spy(model: object, schedule: object, **kwargs: object) -> object:
        seen.append(schedule)
        return real(model, schedule, **kwargs)

    monkeypatch.setattr(train, "apply_schedule", spy)
    stage = Stage(name="s", steps=1, layers=4, lr=1e-3, warmup=1, batch_size=2, drop=True, **EASY)
    run(TrainConfig(method=PDropSpec(layers=[1, 2, 3], positions=positions), out=str(tmp_path), model=SHAPE,
                    stages=[stage], eval_every=100, eval_size=4))
    assert [s.positions for s in seen] == [positions or "compact"]
    assert json.loads((tmp_path / "config.json").read_text())["method"]["positions"] == positions


def test_unknown_pdrop_position_policy_fails_before_training(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="positions='shifted'"):
        run(TrainConfig(method=PDropSpec(layers=[1, 2, 3], positions="shifted"), out=str(tmp_path), model=SHAPE,
                        stages=[Stage(layers=4, drop=True, **EASY)]))
    assert not (tmp_path / "log.jsonl").exists()


def test_unknown_method_fails(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="method='fastv' does not train"):
        run(TrainConfig(method=FastVSpec(), out=str(tmp_path), stages=[Stage()]))


def test_vision_pretraining_stage_learns_colour(tmp_path: Path) -> None:
    from redundancy.micro.microvqa import patch_targets

    examples = draw(Stage(**EASY), SHAPE, 0, 0, 2)
    targets = patch_targets(examples[0].objects, SHAPE.image_size, SHAPE.patch)
    assert targets.shape == (len(PATCH_TARGETS), 36) and targets[0].max() > 0 and targets[0].min() == 0
    fg = targets[0] > 0
    assert targets[3].sum() == len(examples[0].objects) and (targets[3] <= fg).all()  # one centre per object
    assert ((targets[4] > 0) == fg).all() and ((targets[5] > 0) == fg).all()  # positions on object patches only
    assert ((targets[6] > 0) == fg).all() and ((targets[7] > 0) == fg).all()
    for o in examples[0].objects:  # x, y: 1 + the object's centre on its (own, visible) patches
        cx, cy = o.center()
        xs = targets[6][targets[6] == 1 + int(cx)]
        assert xs.size > 0 and set(targets[7][targets[6] == 1 + int(cx)]) >= {1 + int(cy)}
    cfg = TrainConfig(out=str(tmp_path), model=SHAPE, eval_every=80, eval_size=32,
                      stages=[Stage(name="v", kind="vision", steps=160, layers=4, lr=3e-3, warmup=5, batch_size=16,
                                    targets=["color", "shape", "glyph", "center", "row", "col", "x", "y"], **EASY)])
    run(cfg)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert set(log[-1]["val_patch"]) == {"color", "shape", "glyph", "center", "row", "col", "x_err_px", "y_err_px"}
    assert log[-1]["val_patch"]["color"] > 0.4  # colour is linear in the pixels: learnt first
    assert log[-1]["loss"] < log[0]["loss"]


def test_unknown_stage_kind_fails(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="kind='clip'"):
        run(TrainConfig(out=str(tmp_path), stages=[Stage(kind="clip")]))


def test_sparse_weight_adds_the_loss_on_glyph_and_centre_patches() -> None:

    model, processor = build_micro(_micro(2), vocabulary(SHAPE))
    stage = Stage(**{**EASY, "families": {"color": 0.0, "count": 0.0, "reading": 1.0, "spatial": 0.0}})
    targets = ["color", "shape", "glyph", "center"]
    batch = vision_batch(processor, draw(stage, SHAPE, 0, 0, 8), SHAPE, targets)
    plain = PatchHead(SHAPE.hidden, targets)
    weighted = PatchHead(SHAPE.hidden, targets, sparse_weight=0.5)
    weighted.load_state_dict(plain.state_dict())
    with torch.no_grad():
        logits = plain(model, batch["pixel_values"])
        t = batch["targets"]
        expected = sum(
            torch.nn.functional.cross_entropy(logits[i][t[:, i] > 0], t[:, i][t[:, i] > 0]) for i in (2, 3)
        )
        extra = vision_loss(model, weighted, batch) - vision_loss(model, plain, batch)
    assert (t[:, 2] > 0).any() and (t[:, 3] > 0).any()  # reading scenes carry glyphs; every object a centre
    torch.testing.assert_close(extra, 0.5 * expected)
    with pytest.raises(ValueError, match="must start with color"):
        PatchHead(SHAPE.hidden, ["shape", "color"])


def test_position_weight_scales_the_squared_error_of_object_centres() -> None:
    from redundancy.micro.patch_head import patch_accuracy

    model, processor = build_micro(_micro(2), vocabulary(SHAPE))
    batch = vision_batch(processor, draw(Stage(**EASY), SHAPE, 0, 0, 8), SHAPE, ["color", "x", "y"])
    heads = [PatchHead(SHAPE.hidden, ["color", "x", "y"], position_weight=w) for w in (0.0, 3.0)]
    heads[1].load_state_dict(heads[0].state_dict())
    with torch.no_grad():
        logits = heads[0](model, batch["pixel_values"])
        t, fg = batch["targets"], batch["targets"][:, 0] > 0
        expected = sum(  # the centre in units of the image side, against the prediction on object patches
            ((logits[i][..., 0][fg] - (t[:, i][fg] - 1) / SHAPE.image_size) ** 2).mean() for i in (1, 2)
        )
        extra = vision_loss(model, heads[1], batch) - vision_loss(model, heads[0], batch)
        accuracy = patch_accuracy(model, heads[0], batch)
    torch.testing.assert_close(extra, 3.0 * expected)
    assert set(accuracy) == {"color", "x_err_px", "y_err_px"} and accuracy["x_err_px"] > 0


def test_unknown_vision_target_fails_before_training(tmp_path: Path) -> None:
    stages = [Stage(name="q", steps=1, layers=4), Stage(name="v", kind="vision", targets=["color", "depth"])]
    with pytest.raises(ValueError, match="must start with color"):
        run(TrainConfig(out=str(tmp_path), model=SHAPE, stages=stages))
    assert not (tmp_path / "log.jsonl").exists()  # no step of the first stage ran
