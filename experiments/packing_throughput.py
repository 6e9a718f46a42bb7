"""Training throughput with packed questions (redundancy.micro.packing; experiments/log/micro_llava_training.md,
session 9): time training steps of the 4-layer micro-LLaVA (random weights, 144 image tokens)
with k questions per image, and print seconds per step and questions per second. Run from the
repository root:

    python experiments/packing_throughput.py --threads 2 --settings 1x32 4x32 4x16 8x16
"""

import argparse
import dataclasses
import time

import numpy as np
import torch

from redundancy.micro import train as T
from redundancy.micro.model import MicroConfig, build_micro
from redundancy.micro.packing import extra_questions

ap = argparse.ArgumentParser()
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--layers", type=int, default=4)
ap.add_argument("--steps", type=int, default=10, help="timed steps per setting (after 3 warm-up steps)")
ap.add_argument("--settings", nargs="+", default=["1x32", "4x32", "4x16", "8x16"], help="QUESTIONSxIMAGES")
args = ap.parse_args()
torch.set_num_threads(args.threads)
shape = MicroConfig()
model, processor = build_micro(dataclasses.replace(shape, layers=args.layers), T.vocabulary(shape))
model.train()
stage = T.Stage(layers=args.layers, suffix_loss=True, vision_lr_scale=0.1)
optimizer, params = T.build_optimizer(model, None, stage, 0.0)
rng = np.random.default_rng(0)
print(f"{args.layers} layers, {args.threads} threads, {shape.n_image} image tokens, LLaVA prompt + suffix loss")
print("questions/image  images  questions/step  s/step  questions/s")
for setting in args.settings:
    k, images = map(int, setting.split("x"))
    times, asked = [], []
    for step in range(3 + args.steps):
        start = time.perf_counter()
        examples = T.draw(stage, shape, 0, step, images)
        extras = [extra_questions(e, k - 1, stage.families, shape.image_size, rng) for e in examples] if k > 1 else None
        loss = T.step_loss(model, None, processor, examples, shape, torch.device("cpu"), "llava", True, extras)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= 3:
            times.append(time.perf_counter() - start)
            asked.append(images + sum(map(len, extras or [])))
    per_step = float(np.mean(times))
    print(f"{k:>15}  {images:>6}  {np.mean(asked):>14.1f}  {per_step:>6.3f}  {np.mean(asked) / per_step:>11.1f}")
