"""Export a trained micro-LLaVA run as a shipped checkpoint with its model card.

    python -m redundancy.micro.export run=checkpoints/micro-vanilla name=micro-llava-vanilla

The export command stores a trained run's model in bfloat16 safetensors (each
shipped file stays under 25 MiB) under ``redundancy/assets/checkpoints/<name>``,
evaluates the stored weights on the committed held-out test set and writes a
model card (``README.md`` + ``card.json``) beside them.
"""

from __future__ import annotations

import json
import platform
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

import redundancy
from redundancy.data import evaluate as score_predictions
from redundancy.data import load_dataset
from redundancy.health import HEALTH_N, health_record, markdown, table_of
from redundancy.loading import SHIPPED, TEST_SET, git_revision, load_model
from redundancy.schedule import METHOD_SPECS, DropSchedule, MethodSpec, PDropSpec


def portable(path: Any) -> Any:
    """A run's path as the card records it: relative to where the command ran when it lies below it,
    so that no machine's directory layout ends up in a shipped card."""
    if not isinstance(path, str) or not Path(path).is_absolute():
        return path
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return Path(path).name


def export(
    run_dir: str | Path, name: str, command: str, batch_size: int = 64, dest: str | Path | None = None,
    keep_weights: bool = True, health: bool = True,
) -> dict[str, Any]:
    """Ship ``run_dir/last`` as ``name`` (bf16 weights) under ``dest`` (default: the package's
    shipped checkpoints), evaluate it on the held-out test set (its answers in
    ``predictions.jsonl``) and its layer health, and write its card. Returns the card. With
    ``keep_weights=False`` (the extra seeds of a training run) only the card and the answers stay."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from redundancy.evaluate import predict  # late: evaluate imports the engine

    run_dir = Path(run_dir)
    source = run_dir / "last"
    target = Path(dest) / name if dest else SHIPPED / name
    target.parent.mkdir(parents=True, exist_ok=True)
    model = LlavaForConditionalGeneration.from_pretrained(source, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(source)
    tmp = target.with_name(name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # HF's @wraps(Module.to) hides the bound self from mypy (typeshed's _Wrapped has no __get__)
    model.to(torch.bfloat16).save_pretrained(tmp)  # type: ignore[arg-type]
    processor.save_pretrained(tmp)
    for f in tmp.iterdir():
        if f.stat().st_size > 25 * 2**20:
            raise ValueError(f"{f.name} is {f.stat().st_size / 2**20:.1f} MiB; shipped files must stay under 25 MiB")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)

    shipped, processor = load_model(target)
    samples = load_dataset(TEST_SET)
    preds = predict(shipped, processor, samples, batch_size=batch_size)
    result = score_predictions(samples, {s.question_id: p for s, p in zip(samples, preds)})
    with (target / "predictions.jsonl").open("w") as out:
        for s, p in zip(samples, preds):
            out.write(json.dumps({"question_id": s.question_id, "family": s.family, "prediction": p}) + "\n")
    layer_health = health_record(target, samples[:HEALTH_N]) if health else None
    state = json.loads((source / "trainer_state.json").read_text())
    config = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").exists() else {}
    config = {k: portable(v) if k in ("out", "init_from") else v for k, v in config.items()}
    summary = (
        json.loads((run_dir / "train_summary.json").read_text()) if (run_dir / "train_summary.json").exists() else {}
    )
    card = {
        "name": name,
        "command": command,
        "seed": config.get("seed"),
        "train_config": config,
        "training_wall_s": state.get("wall_s", {}),
        "final_loss": state.get("final_loss", {}),
        "train_device": summary.get("device"),
        "train_threads": summary.get("threads"),
        "test_set": "redundancy/assets/microvqa/test",
        "test_accuracy": result,
        "layer_health": layer_health,
        "weights": "bfloat16 safetensors (evaluated after loading in float32)",
        "size_bytes": sum(f.stat().st_size for f in target.iterdir()),
        "package_version": redundancy.__version__,
        "git_revision": git_revision(),
        "machine": f"{platform.machine()} {platform.processor()} ({torch.get_num_threads()} threads)",
    }
    if not keep_weights:
        for f in target.glob("*.safetensors"):
            f.unlink()
        card["weights"] = "not kept (an extra seed: the card and its answers only)"
    (target / "card.json").write_text(json.dumps(card, indent=1))
    (target / "README.md").write_text(card_markdown(card))
    return card


TARGET = 0.9  # the held-out accuracy the shipped vanilla micro-LLaVA is meant to reach
TWIN_GAP = 0.03  # how far a twin trained with another method (PyramidDrop) may fall behind it


def trained_method(train: dict[str, Any]) -> MethodSpec:
    """The method a run's recorded config trained with: its ``method`` group, or in the cards of runs
    before the group existed, ``method`` by name with ``pdrop_layers`` / ``lam`` / ``pdrop_positions``."""
    method = train.get("method", "vanilla")
    if isinstance(method, dict):
        return METHOD_SPECS[method["name"]](**{k: v for k, v in method.items() if k != "name"})
    if method == "pdrop":
        return PDropSpec(layers=train["pdrop_layers"], lam=train["lam"], positions=train.get("pdrop_positions"))
    return METHOD_SPECS[method]()


def card_markdown(card: dict[str, Any]) -> str:
    acc = card["test_accuracy"]
    train = card.get("train_config") or {}
    inherited = (f"; the stages before `{train['start_stage']}` are those of the run it started from "
                 f"(`{train.get('init_from')}`)" if train.get("start_stage") else "")
    twin = "" if trained_method(train).name == "vanilla" else (
        f" That target is the vanilla model's; a twin trained with `{trained_method(train).name}` is to score within "
        f"{100 * TWIN_GAP:.0f} points of its vanilla model (compare that model's card).")
    problems = []
    if acc["accuracy"] < TARGET:
        problems.append(
            f"Below the project's target of {100 * TARGET:.0f}% exact match on the held-out test set.{twin} The\n"
            "per-family accuracies above say which questions it has not learnt. What was tried and measured:\n"
            "`experiments/README.md`.")
    inert = (card.get("layer_health") or {}).get("inert")
    if inert:
        problems.append(
            f"Layers {inert} are inert (skipping one changes no answer and moves the answer's distribution by a KL\n"
            f"below {card['layer_health']['inert_kl']:g}): a layer-dropping study on this model does not probe them.")
    limits = "\n## Limitations\n\n" + "\n\n".join(problems) + "\n" if problems else ""
    spec = trained_method(train)
    method = f"- method: {spec.name}\n"
    if isinstance(spec, PDropSpec):  # the schedule redundancy.micro.train built from this config
        drop_stages = [s["name"] for s in train.get("stages", []) if s.get("drop")]
        schedule = DropSchedule.from_spec(spec)
        method = (f"- method: PyramidDrop in the `{'`, `'.join(drop_stages)}` stage(s): "
                  f"layers {list(schedule.boundaries)}, "
                  f"lambda {spec.lam}, positions {schedule.positions}, ranker {schedule.ranker}, "
                  f"rank layer {schedule.rank_layer}\n")
    fams = "\n".join(f"| {f} | {100 * a:.1f} |" for f, a in acc["per_family"].items())
    depth = {s["name"]: s.get("layers", 32) for s in train.get("stages", [])}
    walls_s = card["training_wall_s"]
    full = sum(w for s, w in walls_s.items() if depth.get(s) == max(depth.values(), default=0))
    share = (f"\nFull-depth training (all layers trainable, every stage at the model's full depth): "
             f"{full / 60:.1f} of {sum(walls_s.values()) / 60:.1f} minutes recorded here "
             f"({100 * full / max(sum(walls_s.values()), 1e-9):.0f}%).\n") if depth else ""
    health = ""
    if card.get("layer_health"):
        record = card["layer_health"]
        health = f"\n## Layer health\n\n{markdown(table_of(record), record['n'])}"
    walls = "\n".join(f"| {s} | {w / 60:.1f} |" for s, w in card["training_wall_s"].items())
    return f"""# {card['name']}

A micro-LLaVA (`LlavaForConditionalGeneration`, 32-layer Llama text model) trained on
generated microvqa questions by `redundancy.micro.train`. Loads offline with
`LlavaForConditionalGeneration.from_pretrained(<this dir>)` and `AutoProcessor.from_pretrained(<this dir>)`.

- command: `{card['command']}`
{method}- seed: {card['seed']}; package {card['package_version']}, git {card['git_revision']}
- weights: {card['weights']}, {card['size_bytes'] / 2**20:.1f} MiB in this directory
- final training loss per stage: {json.dumps({k: round(v, 4) for k, v in card['final_loss'].items() if v is not None})}

Held-out test set (`{card['test_set']}`, {acc['n']} questions, exact match after normalisation):
**{100 * acc['accuracy']:.1f}%** overall

| family | accuracy % |
|---|---|
{fams}

Training wall time per stage ({card['train_device']}, {card['train_threads']} threads){inherited}:

| stage | minutes |
|---|---|
{walls}
{share}{health}{limits}"""


def main(argv: list[str]) -> None:
    args = dict(a.split("=", 1) for a in argv)
    if set(args) - {"run", "name", "command", "dest", "keep_weights", "health"} or not {"run", "name"} <= set(args):
        sys.exit("usage: python -m redundancy.micro.export run=<run dir> name=<shipped name> "
                 "[command=<training command>] "
                 "[dest=<folder> keep_weights=false health=false]")
    card = export(args["run"], args["name"], args.get("command", ""), dest=args.get("dest"),
                  keep_weights=args.get("keep_weights", "true").lower() != "false",
                  health=args.get("health", "true").lower() != "false")
    print(card_markdown(card))


if __name__ == "__main__":
    main(sys.argv[1:])
