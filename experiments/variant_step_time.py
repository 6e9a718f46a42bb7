"""Seconds per training step of a full-depth stage without and with PyramidDrop, interleaved step
by step on the same batches (so load on a shared machine falls on both alike), next to the ratio
the FLOPs accounting predicts for the language model's forward pass. Run from the repository root:

    python experiments/variant_step_time.py checkpoints/v23-vanilla/stage-grow16 --stage deep

The model is grown to the stage's depth as the trainer grows it; both variants start from the same
weights and take ``--steps`` optimiser steps each (the first two not counted); the median of each
and their ratio are printed.
"""

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from transformers import AutoProcessor, LlavaForConditionalGeneration

from redundancy.engine import apply_schedule
from redundancy.flops import full_sequence_flops
from redundancy.micro import train as T
from redundancy.micro.model import build_model, grow
from redundancy.schedule import DropSchedule, PDropSpec

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("--stage", required=True)
ap.add_argument("--config", default="train")
ap.add_argument("--steps", type=int, default=10)
ap.add_argument("--threads", type=int, default=1)
args = ap.parse_args()
if args.steps < 3:
    ap.error("--steps must be at least 3 (the first two are not counted)")
torch.set_num_threads(args.threads)
TRAIN_CONF = Path(__file__).resolve().parents[1] / "redundancy" / "conf" / "train"
with initialize_config_dir(config_dir=str(TRAIN_CONF), version_base=None):
    cfg: T.TrainConfig = OmegaConf.to_object(compose(config_name=args.config))
si = [s.name for s in cfg.stages].index(args.stage)
stage, cpu = cfg.stages[si], torch.device("cpu")
processor = AutoProcessor.from_pretrained(args.model)
schedule = DropSchedule.from_spec(PDropSpec(positions=cfg.method.positions))


def start() -> tuple:
    model = LlavaForConditionalGeneration.from_pretrained(args.model)
    if stage.layers > model.config.text_config.num_hidden_layers:
        deep = build_model(dataclasses.replace(cfg.model, layers=stage.layers), processor.tokenizer, seed=cfg.seed)
        model = grow(model, deep, stage.growth)
    model.train()
    aux = T.aux_head(model, cfg, stage.aux_targets or cfg.aux_targets, cpu) if cfg.aux_weight > 0 else None
    optimizer, params = T.build_optimizer(model, aux, stage, cfg.weight_decay)
    return model, aux, optimizer, params


variants = {"vanilla": start(), "pdrop": start()}
times: dict[str, list[float]] = {name: [] for name in variants}
for step in range(args.steps):
    examples, extras = T.stage_batch(cfg, si, step)
    for name, (model, aux, optimizer, params) in variants.items():
        t0 = time.perf_counter()
        if name == "pdrop":
            with apply_schedule(model, schedule, trace=False):
                loss = T.step_loss(model, None, processor, examples, cfg.model, cpu, stage.prompt, stage.suffix_loss,
                                   extras, aux, cfg.aux_weight)
                loss.backward()
        else:
            loss = T.step_loss(model, None, processor, examples, cfg.model, cpu, stage.prompt, stage.suffix_loss,
                               extras, aux, cfg.aux_weight)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times[name].append(time.perf_counter() - t0)
medians = {name: statistics.median(t[2:]) for name, t in times.items()}
dims = cfg.model.dims(vocab=len(processor.tokenizer))
flops_ratio = full_sequence_flops(dims, schedule) / full_sequence_flops(dims, DropSchedule())
print(f"{args.stage} ({stage.layers} layers, batch {stage.batch_size}, {args.threads} threads, {args.steps - 2} steps "
      f"each, interleaved): vanilla {medians['vanilla']:.3f} s/step, PyramidDrop {medians['pdrop']:.3f} s/step, "
      f"ratio {medians['pdrop'] / medians['vanilla']:.3f}; FLOPs ratio (LM prefill, full sequence) {flops_ratio:.3f}")
