"""Where spatial questions fail (experiments/micro_llava_training.md, session 9). For each model
directory: (1) how well a least-squares linear readout recovers each image token's own column
and row from the projected image features (the language model's input), on held-out tokens,
against predicting the mean; (2) first-token accuracy on validation scenes of 2-4 objects for
the training-only side questions (redundancy.packing.side_questions) and for relations, with
the LLaVA and the bare prompt; (3) the same per axis on 400 other scenes (left/right side
questions, left/right and above/below relations); (4) left/right side questions on scenes of
1-4 objects, bare prompt, by how far the object's centre lies from the middle. Run from the
repository root:

    python experiments/spatial_probe.py redundancy/assets/checkpoints/micro-llava-vanilla
"""

import argparse
import dataclasses

import numpy as np
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from redundancy import train as T
from redundancy.micro import MicroConfig
from redundancy.microvqa import patch_targets, questions
from redundancy.packing import side_questions

ap = argparse.ArgumentParser()
ap.add_argument("models", nargs="+")
ap.add_argument("--threads", type=int, default=2)
args = ap.parse_args()
torch.set_num_threads(args.threads)
shape = MicroConfig()
grid = shape.image_size // shape.patch
images = T.draw(T.Stage(), shape, 5, 0, 200, split="val")
scenes = T.draw(T.Stage(min_objects=2, max_objects=4), shape, 321, 0, 300, split="val")
rng = np.random.default_rng(0)
asked: dict[str, list] = {"side": [], "relation": []}
for e in scenes:
    pools = {"side": side_questions(e.objects, shape.image_size),
             "relation": [q for q in questions(e.objects, shape.image_size) if q.subtype == "relation"]}
    for name, pool in pools.items():
        if pool:
            q = pool[int(rng.integers(len(pool)))]
            asked[name].append(dataclasses.replace(e, question=q.question, answer=q.answer, family=name))

rng = np.random.default_rng(0)  # each part draws its questions from its own stream
axis: dict[str, list] = {"left/right side": [], "left/right relation": [], "above/below relation": []}
for e in T.draw(T.Stage(min_objects=2, max_objects=4), shape, 321, 0, 400, split="val"):
    pools = {"left/right side": [q for q in side_questions(e.objects, shape.image_size) if q.question.startswith("Left")],
             "left/right relation": [q for q in questions(e.objects, shape.image_size)
                                     if q.subtype == "relation" and "left or right" in q.question],
             "above/below relation": [q for q in questions(e.objects, shape.image_size)
                                      if q.subtype == "relation" and "above or below" in q.question]}
    for name, pool in pools.items():
        if pool:
            q = pool[int(rng.integers(len(pool)))]
            axis[name].append(dataclasses.replace(e, question=q.question, answer=q.answer))
rng = np.random.default_rng(0)
far: list = []
offsets: list[float] = []
for e in T.draw(T.Stage(min_objects=1, max_objects=4), shape, 321, 0, 400, split="val"):
    pool = [q for q in side_questions(e.objects, shape.image_size) if q.question.startswith("Left")]
    if pool:
        q = pool[int(rng.integers(len(pool)))]
        far.append(dataclasses.replace(e, question=q.question, answer=q.answer))
        offsets.append(abs(e.objects[q.evidence[0]].center()[0] - shape.image_size / 2))


def hits(model: LlavaForConditionalGeneration, processor: object, items: list) -> np.ndarray:
    """Bare-prompt first-token hits, one per item."""
    out = []
    with torch.no_grad():
        for i in range(0, len(items), 100):
            batch = T.collate(processor, items[i : i + 100], with_answers=False, prompt="bare")
            pred = model(**batch, logits_to_keep=1).logits[:, -1].argmax(-1).tolist()
            out += [w == e.answer for w, e in zip(processor.tokenizer.convert_ids_to_tokens(pred), items[i : i + 100])]
    return np.array(out)


for path in args.models:
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    pixels = processor.image_processor([e.image for e in images], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        feats = torch.stack(list(model.model.get_image_features(pixel_values=pixels).pooler_output)).float().numpy()
    x = np.concatenate([feats.reshape(-1, feats.shape[-1]), np.ones((feats.shape[0] * feats.shape[1], 1))], 1)
    objects = np.stack([patch_targets(e.objects, shape.image_size, shape.patch)[0] > 0 for e in images]).reshape(-1)
    half = len(x) // 2  # fit on the first 100 images' tokens, score on the other 100
    print(path)
    for name, target in (("column", np.arange(grid * grid) % grid), ("row", np.arange(grid * grid) // grid)):
        y = np.tile(target, len(images)).astype(float)
        w = np.linalg.lstsq(x[:half], y[:half], rcond=None)[0]
        err = np.abs(x[half:] @ w - y[half:])
        print(f"  {name}: linear readout error {err.mean():.2f} patches ({err[objects[half:]].mean():.2f} on object "
              f"patches), predicting the mean {np.abs(y[half:] - y[:half].mean()).mean():.2f}")
    for name, items in asked.items():
        acc = {p: T.first_token_accuracy(model, processor, items, prompt=p)["overall"] for p in ("llava", "bare")}
        print(f"  {name} ({len(items)} questions): LLaVA prompt {acc['llava']:.3f}, bare prompt {acc['bare']:.3f}")
    for name, items in axis.items():
        acc = {p: T.first_token_accuracy(model, processor, items, prompt=p)["overall"] for p in ("llava", "bare")}
        print(f"  {name} ({len(items)} questions): LLaVA prompt {acc['llava']:.3f}, bare prompt {acc['bare']:.3f}")
    hit, off = hits(model, processor, far), np.array(offsets)
    bins = ", ".join(f"{lo}-{hi} px {hit[(off >= lo) & (off < hi)].mean():.2f}" for lo, hi in ((12, 18), (18, 26), (26, 48)))
    print(f"  left/right side, 1-4 objects, bare prompt ({len(far)} questions): {hit.mean():.3f} ({bins} off the middle)")
