"""Seconds per training step of one stage of a recipe on this machine: in float32 (what the
trainer runs) and under bfloat16 autocast, and how much of a step is drawing and collating the
batch (experiments/log/micro_llava_training.md, session 18). Run from the repository root:

    python experiments/step_time.py checkpoints/micro-vanilla/stage-all3 --stage all4
    python experiments/step_time.py checkpoints/micro-vanilla/stage-grow --stage final

Each mode runs ``--steps`` optimiser steps from the same weights (the first two not counted).
"""

import argparse
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from transformers import AutoProcessor, LlavaForConditionalGeneration

from redundancy.micro import train as T
from redundancy.micro.packing import collate_packed

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("--stage", required=True)
ap.add_argument("--config", default="train")
ap.add_argument("--steps", type=int, default=12)
ap.add_argument("--threads", type=int, default=2)
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

data = []
for step in range(args.steps):
    t0 = time.perf_counter()
    examples, extras = T.stage_batch(cfg, si, step)
    if extras is not None:
        collate_packed(processor, examples, extras, stage.prompt, n_image=cfg.model.n_image)
    else:
        T.collate(processor, examples, with_answers=True, prompt=stage.prompt)
    data.append(time.perf_counter() - t0)

for mode in ("float32", "bfloat16"):
    model = LlavaForConditionalGeneration.from_pretrained(args.model).train()
    aux = T.aux_head(model, cfg, stage.aux_targets or cfg.aux_targets, cpu) if cfg.aux_weight > 0 else None
    optimizer, params = T.build_optimizer(model, aux, stage, cfg.weight_decay)
    times = []
    for step in range(args.steps):
        t0 = time.perf_counter()
        examples, extras = T.stage_batch(cfg, si, step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bfloat16"):
            loss = T.step_loss(model, None, processor, examples, cfg.model, cpu, stage.prompt, stage.suffix_loss,
                               extras, aux, cfg.aux_weight)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    print(f"{args.stage} ({model.config.text_config.num_hidden_layers} layers, batch {stage.batch_size}, "
          f"{args.threads} threads) {mode}: {statistics.median(times[2:]):.3f} s/step")
print(f"drawing and collating a batch: {statistics.median(data[2:]):.3f} s")
