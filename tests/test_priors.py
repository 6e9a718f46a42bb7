"""The ``debias`` ranker's position prior (redundancy/priors.py): made on first use from the micro
benchmark's val split and cached by key, a given file, one-line failures, and what the prior
measures in a constructed model without content differences (docs/method.md section 3)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from redundancy import priors
from redundancy.engine import apply_schedule
from redundancy.loading import load_model
from redundancy.priors import Prior, calibrate, load_prior, prior_key, save_prior
from redundancy.results import checkpoint_fingerprint
from redundancy.schedule import DropSchedule
from tests.helpers import save_tiny_micro
from tests.reference import make_sample, tiny_model

FASTV = DropSchedule.fastv(K=2, R=0.5, ranker="debias")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(priors.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(priors.IMAGES_ENV, "3")
    monkeypatch.delenv(priors.PRIOR_FILE_ENV, raising=False)
    return tmp_path / "cache" / "priors"


def test_made_on_first_use_then_cached(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint directory: the prior is calibrated on the benchmark's val split when the block
    opens, saved under the cache by its key (fingerprint, layers, image tokens, count), recorded in
    the trace, and read back the next time without calibrating."""
    path = save_tiny_micro(tmp_path / "micro")
    model, processor = load_model(path)
    schedule = DropSchedule.pdrop(layers=(2, 4), lam=0.5, ranker="debias")  # ranking layers 2 and 4 (next)
    inputs = processor(images=[_image()], text=["USER: <image>\nWhat color is the circle? ASSISTANT:"],
                       return_tensors="pt")
    with torch.no_grad(), apply_schedule(model, schedule) as trace:
        first = model(**inputs).logits
    key = prior_key(checkpoint_fingerprint(path), (2, 4), 16, 3)
    assert trace.prior == key
    assert [p.name for p in cache.iterdir()] == [f"{key}.safetensors"]
    stored = load_prior(cache / f"{key}.safetensors")
    assert stored.layers == (2, 4) and stored.values.shape == (2, 16)
    assert torch.all(stored.values > 0) and torch.all(stored.values.sum(1) <= 1 + 1e-6)

    def refuse(*args, **kwargs):
        raise AssertionError("calibrated again instead of reading the cache")

    monkeypatch.setattr(priors, "calibrate", refuse)
    priors._MADE.clear()  # a new process: read from the cache
    with torch.no_grad(), apply_schedule(model, schedule) as again:
        second = model(**inputs).logits
    assert again.prior == key
    assert torch.equal(first, second)
    assert [r.kept[0].tolist() for r in again.boundaries] == [r.kept[0].tolist() for r in trace.boundaries]
    monkeypatch.setattr(priors, "calibration_examples", refuse)  # the next batch: nothing read or encoded
    with torch.no_grad(), apply_schedule(model, schedule) as third:
        model(**inputs)
    assert third.prior == key


def test_calibration_images_are_not_test_questions() -> None:
    """The calibration examples are the shipped calibration set, the benchmark's val split as its
    generator makes it: none is a committed test image, and the files are what the generator writes."""
    from redundancy.data import load_dataset
    from redundancy.loading import TEST_SET
    from redundancy.micro.microvqa import config_from_meta, generate, png_bytes

    examples = priors.calibration_examples(64)
    test = {s.image_path.read_bytes() for s in load_dataset(TEST_SET)}
    assert len(examples) == 64 and not any(ex.image_path.read_bytes() in test for ex in examples)
    gen, _, _ = config_from_meta(TEST_SET)
    made = [png_bytes(ex.image) for ex, _ in zip(generate(gen, "val"), range(8))]
    assert [ex.image_path.read_bytes() for ex in examples[:8]] == made
    with pytest.raises(ValueError, match="holds 64"):
        priors.calibration_examples(65)


def test_a_given_file_wins(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``REDUNDANCY_PRIOR=<file>`` (or ``prior=``) is used as is, even for a model built in memory."""
    model = tiny_model("llava", "llama")
    ids, pv, _ = make_sample(model, seed=80)
    prior = Prior("mine", (1,), torch.linspace(1.0, 2.0, 16)[None])
    file = save_prior(prior, tmp_path / "p.safetensors")
    monkeypatch.setenv(priors.PRIOR_FILE_ENV, str(file))
    with torch.no_grad(), apply_schedule(model, FASTV) as trace:
        model(input_ids=ids, pixel_values=pv)
    assert trace.prior == "mine"
    # Scores fall with the prior: the first half of the tokens is kept unless attention disagrees by 2x.
    assert trace.boundaries[0].kept[0].tolist() == list(range(8))
    assert not cache.exists()


@pytest.mark.parametrize("case", ["in memory", "other layers", "other size", "not a prior"])
def test_one_line_failures(case: str, tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model("llava", "llama")
    ids, pv, _ = make_sample(model, seed=81)
    prior: Prior | Path | None = None
    if case == "other layers":
        prior = Prior("mine", (3,), torch.ones(1, 16))
    elif case == "other size":
        prior = Prior("mine", (1,), torch.ones(1, 9))
    elif case == "not a prior":
        prior = tmp_path / "junk.safetensors"
        prior.write_bytes(b"junk")
    with pytest.raises(ValueError) as err, torch.no_grad(), apply_schedule(model, FASTV, prior=prior):
        model(input_ids=ids, pixel_values=pv)
    message = str(err.value)
    assert "\n" not in message and "debias" in message
    assert "REDUNDANCY_PRIOR=<file>" in message or case == "not a prior"
    assert model.config.text_config._attn_implementation == "sdpa"  # the model is restored


@contextlib.contextmanager
def _no_content(model, rope: bool) -> Iterator[None]:
    """Every image token enters the LM with the same features (the first one's), and (``rope``
    False) the rotary embedding is the identity: nothing tells one image position from another."""
    def same(module, args, out):
        return out[:, :1].expand_as(out).clone()

    def identity(module, args, out):
        cos, sin = out
        return torch.ones_like(cos), torch.zeros_like(sin)

    handles = [model.model.multi_modal_projector.register_forward_hook(same)]
    if not rope:
        handles.append(model.model.language_model.rotary_emb.register_forward_hook(identity))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def test_prior_of_a_model_without_positional_bias_is_flat() -> None:
    """Identical image tokens entering the LM: without rotary embedding every position draws the
    same attention in layer 0 (later layers' states differ by the causal prefix each token saw),
    so the prior is flat and ``debias`` ranks exactly as ``last``; with rotary embedding the same
    inputs give a prior that varies by position (the bias it removes)."""
    model = tiny_model("llava", "llama")
    samples = [make_sample(model, seed=82 + i) for i in range(3)]
    inputs = [{"input_ids": ids, "pixel_values": pv} for ids, pv, _ in samples]
    with _no_content(model, rope=False):
        flat = calibrate(model, inputs, (0,))
    with _no_content(model, rope=True):
        biased = calibrate(model, inputs, (0,))
    torch.testing.assert_close(flat, flat.mean().expand_as(flat), rtol=1e-6, atol=0)
    assert float(biased.std() / biased.mean()) > 1e-3
    ids, pv, _ = make_sample(model, seed=90)
    kept = {}
    for ranker, prior in (("last", None), ("debias", Prior("flat", (0,), flat))):
        schedule = DropSchedule.fastv(K=1, R=0.5, ranker=ranker)
        with torch.no_grad(), apply_schedule(model, schedule, prior=prior) as trace:
            model(input_ids=ids, pixel_values=pv)
        kept[ranker] = trace.boundaries[0].kept[0].tolist()
        if ranker == "debias":
            scores = trace.boundaries[0].scores[0]
    assert kept["debias"] == kept["last"]
    assert torch.allclose(scores * flat[0, 0], last_scores(model, ids, pv), rtol=1e-5)


def last_scores(model, ids, pv) -> torch.Tensor:
    with torch.no_grad(), apply_schedule(model, DropSchedule.fastv(K=1, R=0.5)) as trace:
        model(input_ids=ids, pixel_values=pv)
    return trace.boundaries[0].scores[0]


def _image():
    from PIL import Image

    return Image.new("RGB", (96, 96), (200, 30, 30))


def test_sweep_rows_record_the_prior(tmp_path: Path, cache: Path) -> None:
    """``python -m redundancy.sweep method.ranker=[debias,pool]``: a row per ranker, the ``debias``
    row naming the key of the prior it was ranked with (made on first use), ``pool`` none."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from redundancy import sweep
    from redundancy.cli import CONF
    from redundancy.results import load_results

    path = save_tiny_micro(tmp_path / "micro")
    overrides = [f"model.path={path}", "model.num_layers=null", "data.limit=4", "batch_size=4",
                 f"out={tmp_path / 'out'}", "timing.repeats=0", "progress=false", "layer=2", "ratio=0.5",
                 "method.ranker=[debias,pool]"]
    with initialize_config_dir(config_dir=str(CONF / "sweep"), version_base=None):
        cfg = OmegaConf.to_object(compose(config_name="sweep", overrides=overrides))
    sweep.run(cfg)
    rows = load_results(tmp_path / "out").set_index("ranker")
    assert rows.loc["debias", "prior"] == prior_key(checkpoint_fingerprint(path), (1,), 16, 3)
    assert rows.loc["pool", "prior"] is None or rows.loc["pool", "prior"] != rows.loc["pool", "prior"]  # None / NaN


def test_a_non_default_prior_is_part_of_the_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sweep must not reuse a ``debias`` point made with another prior: a given file (by content) or
    another calibration count changes the point's key; the default calibration keeps the key it
    always had, and rankers other than ``debias`` never depend on it."""
    from types import SimpleNamespace

    from redundancy.results import point_key
    from redundancy.schedule import DropSchedule
    from redundancy.sweep import point_identity

    ctx = SimpleNamespace(identity={"checkpoint": "c", "data": "d"})
    debias, last = DropSchedule.drop(2, 0.5, ranker="debias"), DropSchedule.drop(2, 0.5, ranker="last")
    monkeypatch.delenv("REDUNDANCY_PRIOR", raising=False)
    monkeypatch.delenv("REDUNDANCY_PRIOR_IMAGES", raising=False)
    default = point_key(point_identity(ctx, debias))
    assert default == point_key({**ctx.identity, "schedule": debias.record()})
    monkeypatch.setenv("REDUNDANCY_PRIOR_IMAGES", "32")
    fewer = point_key(point_identity(ctx, debias))
    prior = tmp_path / "p.safetensors"
    prior.write_bytes(b"one")
    monkeypatch.setenv("REDUNDANCY_PRIOR", str(prior))
    one = point_key(point_identity(ctx, debias))
    prior.write_bytes(b"two")
    two = point_key(point_identity(ctx, debias))
    assert len({default, fewer, one, two}) == 4
    assert point_key(point_identity(ctx, last)) == point_key({**ctx.identity, "schedule": last.record()})
