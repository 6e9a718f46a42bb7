"""The sweep entry point: configuration checks, rows, resume, TextVQA data, launchers (redundancy/sweep.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from PIL import Image

from redundancy import sweep
from redundancy.evaluate import predict
from redundancy.loading import load_model
from redundancy.results import ResultStore, load_results, load_samples
from redundancy.schedule import DropSchedule
from tests.helpers import ROOT, tiny
from tests.helpers import sweep_config as config

CONF = ROOT / "redundancy" / "conf" / "sweep"


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(sweep, "load_model", refuse)


# ---------------------------------------------------------------- invalid overrides
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["ratio=1.5"], "ratio=1.5 is outside the allowed range [0, 1]"),
        (["ratio=[0.1,-0.5]"], "ratio=-0.5 is outside the allowed range [0, 1]"),
        (["layer=40"], "layer=40: boundary 40 is outside the allowed range [1, 31] for a model with 32 layers"),
        (["layer=0"], "layer=0: boundary 0 is outside the allowed range [1, 31]"),
        (["method=fastv", "method.K=32"], "K=32: boundary 32 is outside the allowed range [1, 31]"),
        (["method=pdrop", "method.lam=2"], "lam=2.0 is outside the allowed range [0, 1]"),
        (["method.ranker=attention"], "ranker='attention' is unknown; choose one of"),
        (["method=fastv", "layer=8"], "layer= and ratio= are shorthands for method=drop"),
        (["batch_size=0"], "batch_size=0 is outside the allowed range [1, inf)"),
    ],
)
def test_invalid_override_fails_before_anything_loads(
    overrides: list[str], message: str, tmp_path: Path, no_model_load: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The default model (the shipped checkpoint, declared 32 layers) need not even exist.
    monkeypatch.setattr(sweep, "resolve", lambda path: pytest.fail("the model path was resolved"))
    with pytest.raises(ValueError) as err:
        sweep.run(config(f"out={tmp_path}", *overrides))
    assert message in str(err.value)
    assert not tmp_path.joinpath("points").exists()


def test_layer_checked_against_the_models_own_depth(tiny_dir: Path, tmp_path: Path, no_model_load: None) -> None:
    message = r"layer=6: boundary 6 is outside the allowed range \[1, 5\] for a model with 6 layers"
    with pytest.raises(ValueError, match=message):
        sweep.run(tiny(tiny_dir, tmp_path, "layer=[2,6]"))
    with pytest.raises(ValueError, match="model.num_layers=32 but .* has 6 layers"):
        sweep.run(tiny(tiny_dir, tmp_path, "model.num_layers=32"))


def test_unknown_method_or_key_fails_at_composition() -> None:
    with pytest.raises(ConfigCompositionException, match="method/attention"):
        config("method=attention")
    with pytest.raises(ConfigCompositionException):
        config("method.K=3")  # a FastV parameter under method=drop
    with pytest.raises(ConfigCompositionException):
        config("ratoi=0.1")


def test_command_line_errors_are_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "redundancy.sweep", f"out={tmp_path}", "ratio=1.5"],
                          check=False, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: ratio=1.5 is outside the allowed range [0, 1]"


def test_missing_model_path_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(config_name="sweep", overrides=["model=llava-1.5"])
    with pytest.raises(SystemExit) as err:
        sweep.require_complete(cfg)
    assert err.value.code == 2 and "error: model.path must be given" in capsys.readouterr().err


# ---------------------------------------------------------------- grids and records
def test_grid_writes_a_row_per_point(tiny_dir: Path, tmp_path: Path) -> None:
    text = sweep.run(tiny(tiny_dir, tmp_path, "layer=[2,4]", "ratio=[0,0.5]", "method.ranker=[last,random]"))
    df = load_results(tmp_path)
    assert len(df) == 1 + 2 * 2 * 2 and df["key"].is_unique  # the vanilla reference + the grid
    assert "9 new, 0 done before" in text and "shared prefix: 16 replays" in text
    drop = df[df["method"] == "drop"]
    assert sorted(set(zip(drop["layer"], drop["ratio"], drop["ranker"]))) == [
        (k, r, rk) for k in (2, 4) for r in (0.0, 0.5) for rk in ("last", "random")]
    row = drop[(drop["layer"] == 4) & (drop["ratio"] == 0.5) & (drop["ranker"] == "last")].iloc[0]
    assert row["kept_per_stage"] == [16.0, 8.0] and row["avg_image_tokens"] == pytest.approx((4 * 16 + 2 * 8) / 6)
    assert row["n"] == 6 and 0.0 <= row["ci_low"] <= row["accuracy"] <= row["ci_high"] <= 1.0
    assert row["image_tflops"] < df[df["method"] == "vanilla"].iloc[0]["image_tflops"]
    assert row["config.method.ratio"] == 0.5 and row["config.layer"] == 4 and row["positions"] == "keep"
    for column in ("checkpoint_id", "data_id", "git", "version", "seed", "rank_layer", "full_tflops", "wall_s",
                   "per_family.color", "shared_prefix", "torch", "transformers"):
        assert column in df.columns
    samples = load_samples(tmp_path)
    assert len(samples) == 9 * 6
    mine = samples[samples["key"] == row["key"]]
    assert list(mine["kept"].map(tuple)) == [(16, 8)] * 6
    assert row["accuracy"] == pytest.approx(mine["score"].mean())


def test_single_point_has_no_reference_unless_asked(tiny_dir: Path, tmp_path: Path) -> None:
    sweep.run(tiny(tiny_dir, tmp_path, "layer=3", "ratio=0.1"))
    assert list(load_results(tmp_path)["point"]) == ["drop layer=3 ratio=0.1"]
    sweep.run(tiny(tiny_dir, tmp_path, "layer=3", "ratio=0.1", "reference=true"))
    assert sorted(load_results(tmp_path)["point"]) == ["drop layer=3 ratio=0.1", "vanilla"]


def test_sharing_on_and_off_record_the_same_answers(tiny_dir: Path, tmp_path: Path) -> None:
    grid = ("layer=[1,3]", "ratio=[0.25,1]")
    sweep.run(tiny(tiny_dir, tmp_path / "shared", *grid))
    sweep.run(tiny(tiny_dir, tmp_path / "separate", *grid, "share=false"))
    a, b = load_samples(tmp_path / "shared"), load_samples(tmp_path / "separate")
    columns = ["key", "question_id", "prediction", "score", "kept"]
    assert a[columns].sort_values(["key", "question_id"]).equals(b[columns].sort_values(["key", "question_id"]))
    assert a["shared_prefix"].all() and not b["shared_prefix"].any()


# ---------------------------------------------------------------- resume
def test_rerun_skips_points_already_done(tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    grid = ("layer=[2,4]", "ratio=[0.1,0.5]")
    sweep.run(tiny(tiny_dir, tmp_path, *grid))
    before = {p.name: p.read_text() for p in (tmp_path / "points").iterdir()}
    monkeypatch.setattr(sweep, "load_model", lambda *a, **k: pytest.fail("a finished sweep loaded the model"))
    text = sweep.run(tiny(tiny_dir, tmp_path, *grid))
    assert "0 new, 5 done before" in text
    assert {p.name: p.read_text() for p in (tmp_path / "points").iterdir()} == before
    # A larger grid computes only its new points.
    monkeypatch.undo()
    text = sweep.run(tiny(tiny_dir, tmp_path, "layer=[2,4]", "ratio=[0.1,0.5,0.75]"))
    assert "2 new, 5 done before" in text and len(load_results(tmp_path)) == 7


def test_crash_loses_at_most_the_batch_in_flight(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash after the first batch of a 2-batch sweep: the rerun answers only the second batch."""
    grid = ("layer=[2,4]", "ratio=0.5")
    appended: list[int] = []
    original = ResultStore.append_partial

    def crash_on_second_batch(self: ResultStore, key: str, records: Any) -> None:
        appended.append(len(records))
        if len(appended) > 3:  # three points answered batch 1; crash in batch 2
            raise KeyboardInterrupt
        original(self, key, records)

    monkeypatch.setattr(ResultStore, "append_partial", crash_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        sweep.run(tiny(tiny_dir, tmp_path, *grid))
    assert not (tmp_path / "points").exists() and len(list((tmp_path / "partial").iterdir())) == 3
    monkeypatch.undo()

    answered: list[int] = []
    run_grid = sweep.run_grid

    def counting(*args: Any, **kwargs: Any) -> Any:
        answered.extend(len(t) for t in kwargs["todo"])
        return run_grid(*args, **kwargs)

    monkeypatch.setattr(sweep, "run_grid", counting)
    sweep.run(tiny(tiny_dir, tmp_path, *grid))
    assert answered == [2, 2, 2]  # only the second batch (questions 5-6) of each point
    resumed = load_samples(tmp_path)
    assert len(resumed) == 3 * 6 and not list((tmp_path / "partial").iterdir())
    fresh = tmp_path / "fresh"
    sweep.run(tiny(tiny_dir, fresh, *grid))
    columns = ["key", "question_id", "prediction", "kept"]
    order = ["key", "question_id"]
    assert resumed[columns].sort_values(order).reset_index(drop=True).equals(
        load_samples(fresh)[columns].sort_values(order).reset_index(drop=True))


# ---------------------------------------------------------------- TextVQA
def write_textvqa(root: Path, answers: list[list[str]]) -> Path:
    """A TextVQA-format directory (one json + images/<image_id>.jpg), images drawn here."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    data = []
    for i, (colour, refs) in enumerate(zip(("red", "green", "blue"), answers)):
        Image.new("RGB", (40, 30), colour).save(root / "images" / f"img{i}.jpg")
        data.append({"question_id": 100 + i, "question": "what is written on the sign", "image_id": f"img{i}",
                     "answers": refs, "question_type": "reading"})
    (root / "TextVQA_tiny_val.json").write_text(json.dumps({"dataset_name": "textvqa", "data": data}))
    return root


def test_textvqa_directory_scored_with_vqa_accuracy(tiny_dir: Path, tmp_path: Path) -> None:
    """Three of ten humans gave the model's answer: VQA accuracy 0.9 per question (exact match would say 1)."""
    data = write_textvqa(tmp_path / "textvqa", [["x"] * 10] * 3)
    cfg = tiny(tiny_dir, tmp_path / "out", "data=textvqa", f"data.path={data}", "data.limit=null", "layer=2",
               "ratio=0.5", "data.max_new_tokens=2")
    samples, _ = sweep.load_samples(cfg.data)
    assert all(s.question.endswith("single word or phrase.") for s in samples)
    model, processor = load_model(tiny_dir)
    preds = predict(model, processor, samples, schedule=DropSchedule.drop(2, 0.5), max_new_tokens=2, progress=False)
    write_textvqa(data, [[p] * 3 + ["zzz"] * 7 for p in preds])
    sweep.run(cfg)
    row = load_results(tmp_path / "out").iloc[0]
    assert row["metric"] == "vqa" and row["n"] == 3 and row["data"] == "textvqa" and row["ci_method"] == "normal"
    assert row["accuracy"] == pytest.approx(0.9) and row["per_family.reading"] == pytest.approx(0.9)
    assert list(load_samples(tmp_path / "out")["prediction"]) == preds


def test_textvqa_needs_a_path() -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(config_name="sweep", overrides=["data=textvqa"])
    assert OmegaConf.missing_keys(cfg) == {"data.path"}


# ---------------------------------------------------------------- configs and launchers
@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_experiment_expands(experiment: str) -> None:
    cfg = config(f"experiment={experiment}")
    points = sweep.schedules_from_config(cfg, 32)
    assert len(points) > 1 and points[0].is_vanilla


def test_redundancy_experiment_is_the_study_grid() -> None:
    points = sweep.schedules_from_config(config("experiment=redundancy"), 32, checkpoint_id="c")
    drops = [p for p in points if p.method == "drop"]
    by_ranker = {
        r: [p for p in drops if p.ranker == r] for r in ("last", "instruction", "uniform", "inverse", "random")
    }
    assert all(len(by_ranker[r]) == 40 for r in ("last", "instruction", "uniform", "inverse"))
    assert len(by_ranker["random"]) == 40 * 5 and len({p.seed for p in by_ranker["random"]}) == 200
    assert {p.boundaries[0] for p in drops} == {2, 8, 16, 24} and 0.1 in {p.ratios[0] for p in drops}


# ---------------------------------------------------------------- seeded rankers
def test_random_control_seeds_differ_by_layer_ratio_checkpoint_and_index() -> None:
    cfg = config("layer=[2,8]", "ratio=[0.1,0.5]", "method.ranker=[last,random]", "seeds=3")
    points = sweep.schedules_from_config(cfg, 32, checkpoint_id="ckpt-a")
    random = [p for p in points if p.ranker == "random"]
    assert len(random) == 2 * 2 * 3 and len([p for p in points if p.ranker == "last" and not p.is_vanilla]) == 4
    assert len({p.seed for p in random}) == 12  # layer 2 and layer 8 never share a draw (the old seed was the index)
    assert sorted(p.params["seed"] for p in random) == [0] * 4 + [1] * 4 + [2] * 4
    assert all("seed" not in p.params for p in points if p.ranker == "last")
    other = sweep.schedules_from_config(cfg, 32, checkpoint_id="ckpt-b")
    assert not {p.seed for p in random} & {p.seed for p in other if p.ranker == "random"}
    again = sweep.schedules_from_config(config("layer=[2,8]", "ratio=[0.1,0.5]", "method.ranker=random",
                                               "seed=[0,1,2]"), 32, checkpoint_id="ckpt-a")
    assert [p.record() for p in again if not p.is_vanilla] == [p.record() for p in random]


@pytest.mark.parametrize(("overrides", "message"), [
    (["seeds=0"], "seeds=0 is outside the allowed range [1, inf)"),
    (["seeds=2", "seed=3"], "give one of them"),
    (["seed=-1"], "seed=-1 is not a seed index"),
])
def test_bad_seeds_fail(overrides: list[str], message: str) -> None:
    with pytest.raises(ValueError) as err:
        sweep.schedules_from_config(config(*overrides), 32)
    assert message in str(err.value)


def test_seed_index_recorded_per_row(tiny_dir: Path, tmp_path: Path) -> None:
    sweep.run(tiny(tiny_dir, tmp_path, "layer=[2,4]", "ratio=0.25", "method.ranker=random", "seeds=2"))
    drop = load_results(tmp_path).query("method == 'drop'")
    assert sorted(zip(drop["layer"], drop["seed_index"])) == [(2, 0), (2, 1), (4, 0), (4, 1)]
    assert drop["seed"].is_unique and sorted(set(drop["point"]))[0] == "drop layer=2 ratio=0.25 seed=0"


# ---------------------------------------------------------------- published results
def test_trial_sweep_never_touches_the_published_results(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's one-point command on a checkout whose results/ holds that point (here on 6
    questions): it evaluates the point into outputs/ and prints it; results/ is left byte for byte,
    and writing there takes a study command."""
    monkeypatch.chdir(tmp_path)
    published = tmp_path / "results" / "sweep"
    sweep.run(tiny(tiny_dir, published, "layer=3", "ratio=0.1", "data.limit=null", "study=true",
                   "out=results/sweep"))  # the committed study's point (a whole evaluation, written by study=true)
    before = {p: p.read_bytes() for p in published.rglob("*") if p.is_file()}
    trial = ("layer=3", "ratio=0.1")
    text = sweep.run(config(f"model.path={tiny_dir}", "model.num_layers=null", "timing.repeats=0", "progress=false",
                            "data.limit=6", *trial))
    assert "out outputs/sweep: 1 new, 0 done before" in text and "drop layer=3 ratio=0.1" in text
    assert len(load_results(tmp_path / "outputs" / "sweep")) == 1
    assert {p: p.read_bytes() for p in published.rglob("*") if p.is_file()} == before
    for overrides in (["out=results/sweep"], ["out=results/other"], ["experiment=redundancy"]):
        with pytest.raises(ValueError, match="published study|study=true evaluates every question"):
            sweep.run(config(f"model.path={tiny_dir}", "model.num_layers=null", "data.limit=6", *trial, *overrides))
    assert {p: p.read_bytes() for p in published.rglob("*") if p.is_file()} == before


def test_only_the_study_commands_write_results() -> None:
    assert not sweep.published(config().out) and not config().study
    for path in sorted((CONF / "experiment").glob("*.yaml")):
        cfg = config(f"experiment={path.stem}")
        assert cfg.study and sweep.published(cfg.out), path.name


def test_slurm_launcher_config_composes() -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(config_name="sweep", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "gpu" and launcher.gpus_per_node == 1


@pytest.mark.slow
def test_submitit_multirun_writes_rows_and_rerun_skips(tiny_dir: Path, tmp_path: Path, no_model_load: None) -> None:
    args = [f"model.path={tiny_dir}", "model.num_layers=null", "data.limit=4", f"out={tmp_path}",
            "timing.repeats=0", "progress=false", "threads=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "redundancy.sweep", "-m", "hydra/launcher=submitit_local", *args,
         "layer=1,2", "ratio=0.5"],
        check=False, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = load_results(tmp_path)
    assert sorted(df["point"]) == ["drop layer=1 ratio=0.5", "drop layer=2 ratio=0.5"]
    assert len(list((tmp_path / "multirun").rglob("*_log.out"))) == 2  # two submitit jobs ran them
    # The rows written by the job processes are found again: a rerun of each point loads nothing.
    for layer in (1, 2):
        text = sweep.run(config(*args, f"layer={layer}", "ratio=0.5"))
        assert "0 new, 1 done before" in text


def test_sweep_groups_do_not_shadow_other_entry_points() -> None:
    """A `model` or `data` config group beside flops.yaml would turn its `model=` key into a group
    override; each command's configs live in its own folder (redundancy/conf/<command>/). `method` is
    the one group every command shares (redundancy.schedule.MethodSpec)."""
    with initialize_config_dir(config_dir=str(CONF.parent / "flops"), version_base=None):
        cfg = compose(config_name="flops", overrides=["model=llava-next-7b", "method=fastv"])
        assert cfg.model == "llava-next-7b" and cfg.method.name == "fastv"
    with initialize_config_dir(config_dir=str(CONF.parent / "train"), version_base=None):
        assert compose(config_name="train", overrides=["method=pdrop"]).method.name == "pdrop"
