"""First-token accuracy per question subtype (colour, reading, relation, neighbour, count_shape,
count_all) on generated validation questions, with the LLaVA prompt (the evaluation's), for
each model directory: where a family's errors come from (experiments/log/micro_llava_training.md,
session 13), and on the training-only shape questions about the same images ("What shape is red?",
"What shape is left?": redundancy.micro.packing.shape_questions, one of each kind drawn per image where
the scene allows it). Run from the repository root:

    python experiments/subtype_probe.py redundancy/assets/checkpoints/micro-llava-vanilla --n 1200
"""

import dataclasses

import torch
from probing import arguments
from transformers import AutoProcessor, LlavaForConditionalGeneration

from redundancy.micro import train as T
from redundancy.micro.microvqa import Question
from redundancy.micro.model import MicroConfig
from redundancy.micro.packing import shape_questions

args = arguments(threads=2, n=1200)
shape = MicroConfig()
# Seed 11: not the training runs' validation draw (seed 0), so no run has selected on it.
drawn = T.draw(T.Stage(), shape, 11, 0, args.n, split="val")
examples = [dataclasses.replace(e, family=e.subtype) for e in drawn]
shapes = []
for e in drawn:  # the first shape question of each kind about the image
    firsts: dict[str, Question] = {}
    for q in shape_questions(e.objects, shape.image_size):
        firsts.setdefault(q.subtype, q)
    shapes += [dataclasses.replace(e, question=q.question, answer=q.answer, family=q.subtype) for q in firsts.values()]

for path in args.models:
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    with torch.no_grad():
        acc = T.first_token_accuracy(model, processor, examples)
        extra = T.first_token_accuracy(model, processor, shapes)
    print(path, f"({args.n} questions)")
    print("  " + "  ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    print("  training-only: " + "  ".join(f"{k} {v:.3f}" for k, v in extra.items() if k != "overall"))
