"""Where a model's neighbour answers ("What shape is left of the red circle?") go wrong
(experiments/log/micro_llava_training.md, session 17), for each model directory:

- held-out test set: exact-match accuracy per question subtype (errors in parentheses), with
  the weights rounded to bf16 as the shipped export stores them, and what each wrong
  neighbour answer names: the referent's own shape, another object's, or a shape not in the
  image;
- neighbour questions only, split by the number of objects in the scene (``--n`` generated
  validation questions, seed 11, first answer token, float32 weights as ``subtype_probe.py``).

Run from the repository root:

    python experiments/neighbor_probe.py redundancy/assets/checkpoints/micro-llava-vanilla
"""

import dataclasses
import json
from collections import Counter, defaultdict

import torch
from probing import arguments
from transformers import AutoProcessor, LlavaForConditionalGeneration

from redundancy.data import exact_match, load_dataset
from redundancy.evaluate import predict
from redundancy.micro import train as T
from redundancy.micro.microvqa import SHAPES
from redundancy.micro.model import MicroConfig

TEST_SET = "redundancy/assets/microvqa/test"

args = arguments(threads=2, n=600)
samples = load_dataset(TEST_SET)
with open(f"{TEST_SET}/questions.jsonl") as f:
    records = {r["question_id"]: r for r in map(json.loads, f)}
stage = T.Stage(families={"spatial": 1.0}, subtypes={"relation": 0.0})
by_size = [dataclasses.replace(e, family=f"{len(e.objects)} objects")
           for e in T.draw(stage, MicroConfig(), 11, 0, args.n, split="val")]  # fmt: skip

for path in args.models:
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    rounded = LlavaForConditionalGeneration.from_pretrained(path, torch_dtype=torch.bfloat16).float().eval()
    processor = AutoProcessor.from_pretrained(path)
    answers = predict(rounded, processor, samples, progress=False)
    right: dict[str, list[float]] = defaultdict(list)
    wrong: Counter[str] = Counter()
    for sample, answer in zip(samples, answers):
        record = records[sample.question_id]
        right[record["subtype"]].append(exact_match(answer, sample.answers))
        if record["subtype"] == "neighbor" and not right["neighbor"][-1]:
            color, shape = sample.question.rstrip("?").split()[-2:]
            others = [o["shape"] for o in record["objects"] if (o["color"], o["shape"]) != (color, shape)]
            kind = ("the referent's shape" if answer == shape else "another object's shape" if answer in others
                    else "a shape not in the image" if answer in SHAPES else "not a shape")
            wrong[kind] += 1
    every = [x for v in right.values() for x in v]
    print(path)
    print(f"  test set: overall {100 * sum(every) / len(every):.1f} ({len(every) - int(sum(every))} errors); "
          + "  ".join(f"{k} {100 * sum(v) / len(v):.1f} ({len(v) - int(sum(v))})" for k, v in sorted(right.items())))
    print("  wrong neighbour answers: " + ", ".join(f"{k} {v}" for k, v in wrong.most_common()))
    with torch.no_grad():
        acc = T.first_token_accuracy(model, processor, by_size)
    print(f"  neighbour questions by scene size ({args.n}): " + "  ".join(f"{k} {v:.3f}" for k, v in acc.items()))
