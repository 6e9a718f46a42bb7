"""The lmms-eval plugin: lmms-eval answers and scores the shipped benchmark exactly as the project's own path.

Runs on the shipped micro-LLaVA when it is there, else on a tiny random 32-layer micro-LLaVA
saved to a temporary directory (the two paths must agree on any weights).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

try:
    import lmms_eval  # noqa: F401
except ImportError:
    if os.environ.get("CI"):
        raise  # CI installs lmms-eval (.ci/run): the end-to-end test must run there
    pytest.skip("lmms-eval is not installed (see the README's install block: the lmms extra)", allow_module_level=True)

from lmms_eval.api.instance import Instance
from lmms_eval.evaluator import simple_evaluate
from lmms_eval.models import get_model
from lmms_eval.tasks import TaskManager
from lmms_eval.utils import load_yaml_config, simple_parse_args_string

from redundancy.data import evaluate, load_dataset
from redundancy.engine import apply_schedule
from redundancy.evaluate import predict
from redundancy.lmms import MODEL_NAME, TASKS_DIR
from redundancy.lmms.model import PluginError, RedundancyLlava, schedule_from_args
from redundancy.loading import SHIPPED, TEST_SET, load_model
from redundancy.micro.model import MicroConfig, build_micro
from redundancy.micro.train import vocabulary
from redundancy.schedule import DropSchedule

TASK = "redundancy_microvqa"
SHIPPED_NAME = "micro-llava-vanilla"
LIMIT = 16
BATCH = 8
TINY = MicroConfig(layers=32, hidden=32, heads=2, kv_heads=2, ffn=64, image_size=48, patch=8,
                   vision_layers=1, vision_hidden=32, vision_heads=2, vision_ffn=64)
# --model_args of each method, and the schedule the sweep builds for it.
METHODS = {
    "vanilla": ("method=vanilla", DropSchedule.vanilla()),
    "drop": ("method=drop,layer=2,ratio=0.0", DropSchedule.drop(layer=2, ratio=0.0)),
    "fastv": ("method=fastv,K=2,R=0.5", DropSchedule.fastv(K=2, R=0.5)),
    "pdrop": ("method=pdrop,layers=[8,16,24],lam=0.5", DropSchedule.pdrop(layers=(8, 16, 24), lam=0.5)),
    "pdrop-random-keep": (
        "method=pdrop,lam=0.5,ranker=random,positions=keep,seed=1",
        DropSchedule.pdrop(lam=0.5, ranker="random", positions="keep", seed=1),
    ),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The shipped checkpoint's name, or the directory of a tiny random micro-LLaVA."""
    if (SHIPPED / SHIPPED_NAME).is_dir():
        return SHIPPED_NAME
    model, processor = build_micro(TINY, vocabulary(MicroConfig()))
    # build_micro starts every decoder layer as the identity (zero residual outputs), which would
    # make the answers independent of the image and of any drop; give those weights random values.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            for w in (layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight):
                w.copy_(0.05 * torch.randn(w.shape, generator=gen))
    path = tmp_path_factory.mktemp("tiny-micro-llava")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def task_manager() -> TaskManager:
    return TaskManager("WARNING", include_path=str(TASKS_DIR), include_defaults=False)


def project_scores(checkpoint: str, schedule: DropSchedule) -> tuple[dict[str, str], dict[str, Any]]:
    """What the sweep computes: ``predict`` answers, ``redundancy.data.evaluate`` scores."""
    model, processor = load_model(checkpoint)
    samples = load_dataset(TEST_SET)[:LIMIT]
    preds = dict(zip((s.question_id for s in samples), predict(model, processor, samples, schedule=schedule,
                                                                 batch_size=BATCH, progress=False)))
    return preds, evaluate(samples, preds)


def test_entry_point_registers_the_model() -> None:
    assert get_model(MODEL_NAME) is RedundancyLlava


def test_model_args_build_the_schedules_of_the_builders() -> None:
    for args, schedule in METHODS.values():
        assert schedule_from_args(**simple_parse_args_string(args)) == schedule  # as lmms-eval parses them
    assert schedule_from_args("pdrop", ratios="[0.5,0.2]", layers="[4,12]") == DropSchedule.pdrop(
        layers=(4, 12), ratios=(0.5, 0.2)
    )
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['lam'\]"):
        schedule_from_args("fastv", lam=0.5)  # a misplaced key is an error, not a silent default
    with pytest.raises(ValueError, match="method='pyramid' is unknown"):
        schedule_from_args("pyramid")


def test_task_reads_the_shipped_test_split() -> None:
    config = load_yaml_config(str(TASKS_DIR / f"{TASK}.yaml"))
    assert config["task"] == TASK
    assert Path(config["dataset_kwargs"]["data_files"]["test"]).resolve() == (TEST_SET / "questions.jsonl").resolve()


@pytest.mark.slow
def test_lmms_eval_scores_equal_the_project_path(checkpoint: str, task_manager: TaskManager) -> None:
    answers = {}
    for name, (args, schedule) in METHODS.items():
        out = simple_evaluate(
            model=MODEL_NAME, model_args=f"pretrained={checkpoint},{args}", tasks=[TASK], task_manager=task_manager,
            limit=LIMIT, batch_size=BATCH, device="cpu", bootstrap_iters=0, log_samples=True, verbosity="WARNING",
        )
        lmms = {s["doc"]["question_id"]: s["filtered_resps"][0] for s in out["samples"][TASK]}
        metrics = out["results"][TASK]
        preds, report = project_scores(checkpoint, schedule)
        assert lmms == preds, name
        assert metrics["exact_match,none"] == pytest.approx(report["accuracy"], abs=1e-12), name
        for family, accuracy in report["per_family"].items():
            assert metrics[f"{family},none"] == pytest.approx(accuracy, abs=1e-12), (name, family)
        answers[name] = lmms
    # The schedules reached the model: dropping every image token from layer 2 changes answers.
    assert answers["drop"] != answers["vanilla"]


@pytest.mark.slow
def test_cli_runs_offline_and_records_the_method(checkpoint: str, tmp_path: Path) -> None:
    args, schedule = METHODS["pdrop"]
    cmd = [
        sys.executable, "-m", "lmms_eval", "--model", MODEL_NAME, "--model_args", f"pretrained={checkpoint},{args}",
        "--tasks", TASK, "--include_path", str(TASKS_DIR), "--device", "cpu", "--batch_size", str(BATCH),
        "--limit", str(LIMIT), "--output_path", str(tmp_path),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (results_file,) = tmp_path.rglob("*results*.json")
    results = json.loads(results_file.read_text())
    assert results["config"]["model_args"] == f"pretrained={checkpoint},{args}"
    assert f"redundancy schedule: {json.dumps(schedule.record())}" in run.stdout + run.stderr
    _, report = project_scores(checkpoint, schedule)
    assert results["results"][TASK]["exact_match,none"] == pytest.approx(report["accuracy"], abs=1e-12)


def test_loglikelihood_matches_greedy_decoding_under_the_schedule(checkpoint: str) -> None:
    """The continuation scored in one pruned forward pass (context labelled -100, so the
    ranking query is the last context token) has the log-probability that cached greedy
    decoding gave its tokens, and is greedy."""
    lm = RedundancyLlava(pretrained=checkpoint, method="pdrop", lam=0.5, device="cpu")
    samples = load_dataset(TEST_SET)[:4]
    lm.task_dict = {"t": {"test": [{"image": str(s.image_path)} for s in samples]}}
    tok = lm.processor.tokenizer

    def doc_to_visual(doc: dict[str, str]) -> list[Image.Image]:
        return [Image.open(doc["image"])]

    requests, expected = [], []
    for i, s in enumerate(samples):
        prompt = lm.prompt(s.question, 1)
        inputs = lm._inputs(doc_to_visual(lm.task_dict["t"]["test"][i]), [prompt])
        with torch.no_grad(), apply_schedule(lm.model, lm.schedule, trace=False):
            out = lm.model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                                    return_dict_in_generate=True)
        new = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
        n = new.index(tok.eos_token_id) if tok.eos_token_id in new else len(new)
        if n == 0:
            continue
        continuation = " " + tok.decode(new[:n])
        assert tok(prompt + continuation)["input_ids"][-n:] == new[:n]  # the words tokenise back
        expected.append(sum(float(F.log_softmax(out.logits[j][0].float(), -1)[new[j]]) for j in range(n)))
        requests.append(Instance("loglikelihood", (s.question, continuation, doc_to_visual, i, "t", "test"), idx=0,
                                 metadata={"task": "t", "doc_id": i, "repeats": 1}))
    assert requests, "every greedy answer was empty"
    results = lm.loglikelihood(requests)
    for (logprob, greedy), want in zip(results, expected):
        assert greedy
        assert logprob == pytest.approx(want, rel=1e-4, abs=1e-4)


def test_refuses_what_it_cannot_do(checkpoint: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Bad model arguments end the command (a SystemExit, which lmms-eval's catch-all of
    Exception lets through) with exit code 2 and one error line."""
    for kwargs, message in [
        ({"method": "drop", "layer": 40, "ratio": 0.5}, "outside the allowed range"),
        ({"method": "drop", "layer": 2, "ratio": 1.5}, "outside the allowed range"),
        ({"batch_size": "auto"}, "batch_size='auto'"),
        ({"method": "fastv", "lam": 0.5}, r"unknown argument\(s\) \['lam'\]"),
        ({"method": "pdrop", "lamm": 0.5}, "did you mean 'lam'"),
    ]:
        with pytest.raises(PluginError, match=message) as info:
            RedundancyLlava(pretrained=checkpoint, device="cpu", **kwargs)
        assert info.value.code == 2 and not isinstance(info.value, Exception)
        assert capsys.readouterr().err.startswith("error: redundancy_llava: ")
    with pytest.raises(PluginError, match="neither a shipped checkpoint"):
        RedundancyLlava(pretrained="no-such-model", device="cpu")


def test_a_failed_request_ends_the_run(checkpoint: str) -> None:
    lm = RedundancyLlava(pretrained=checkpoint, method="fastv", device="cpu")
    lm.task_dict = {"t": {"test": [{}]}}

    def broken_visual(doc: dict[str, Any]) -> list[Image.Image]:
        raise RuntimeError("the image store is gone")

    request = Instance("generate_until", ("What?", {"until": []}, broken_visual, 0, "t", "test"), idx=0,
                       metadata={"task": "t", "doc_id": 0, "repeats": 1})
    with pytest.raises(PluginError, match="the image store is gone") as info:
        lm.generate_until([request])
    assert info.value.code == 1
    loglik = Instance("loglikelihood", ("What?", " red", broken_visual, 0, "t", "test"), idx=0,
                      metadata={"task": "t", "doc_id": 0, "repeats": 1})
    with pytest.raises(PluginError) as info:
        lm.loglikelihood([loglik])
    assert info.value.code == 1


def _truncated_copy(checkpoint: str, root: Path) -> str:
    source = SHIPPED / checkpoint if (SHIPPED / checkpoint).is_dir() else Path(checkpoint)
    target = root / "truncated"
    shutil.copytree(source, target)
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return str(target)


def _broken_task(root: Path) -> Path:
    """The shipped task with images that are not images (doc_to_visual returns the question text)."""
    text = (TASKS_DIR / f"{TASK}.yaml").read_text()
    text = text.replace(f"task: {TASK}", "task: broken_microvqa")
    text = text.replace("../../assets/microvqa/test/questions.jsonl  # relative to this file",
                        str(TEST_SET / "questions.jsonl"))
    text = text.replace("doc_to_visual: !function redundancy.lmms.microvqa.doc_to_visual",
                        "doc_to_visual: !function redundancy.lmms.microvqa.doc_to_text")
    folder = root / "tasks"
    folder.mkdir()
    (folder / "broken_microvqa.yaml").write_text(text)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("case", ["layer out of range", "truncated weights", "a request fails"])
def test_cli_exits_non_zero_on_failure(case: str, checkpoint: str, tmp_path: Path) -> None:
    """lmms-eval's CLI logs every Exception and exits 0; the plugin's failures reach the exit code."""
    pretrained, args, task, include = checkpoint, "method=drop,layer=40,ratio=0.5", TASK, TASKS_DIR
    if case == "truncated weights":
        pretrained, args = _truncated_copy(checkpoint, tmp_path), "method=vanilla"
    elif case == "a request fails":
        args, task, include = "method=vanilla", "broken_microvqa", _broken_task(tmp_path)
    cmd = [sys.executable, "-m", "lmms_eval", "--model", MODEL_NAME, "--model_args", f"pretrained={pretrained},{args}",
           "--tasks", task, "--include_path", str(include), "--device", "cpu", "--batch_size", "2", "--limit", "2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 2, run.stderr[-3000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert errors and errors[0].startswith(f"error: {MODEL_NAME}: "), run.stderr[-3000:]
