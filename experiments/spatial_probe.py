"""Where spatial questions fail (experiments/log/micro_llava_training.md, session 9). For each model
directory: (1) how well a least-squares linear readout recovers each image token's own column
and row from the projected image features (the language model's input), on held-out tokens,
against predicting the mean; (2) first-token accuracy on validation scenes of 2-4 objects for
the training-only side questions (redundancy.micro.packing.side_questions) and for relations, with
the LLaVA and the bare prompt; (3) the same per axis on 400 other scenes (left/right side
questions, left/right and above/below relations); (4) left/right side questions on scenes of
1-4 objects, bare prompt, by how far the object's centre lies from the middle. Run from the
repository root:

    python experiments/spatial_probe.py redundancy/assets/checkpoints/micro-llava-vanilla
"""

import dataclasses
from collections.abc import Callable

import numpy as np
from probing import arguments, load_with_features

from redundancy.micro import train as T
from redundancy.micro.microvqa import Example, Question, patch_targets, questions
from redundancy.micro.model import MicroConfig
from redundancy.micro.packing import side_questions

args = arguments(threads=2)
shape = MicroConfig()
grid = shape.image_size // shape.patch
images = T.draw(T.Stage(), shape, 5, 0, 200, split="val")


def ask(objects: tuple[int, int], n: int, pools: Callable[[Example], dict[str, list[Question]]]) -> dict[str, list]:
    """``n`` validation scenes of ``objects`` = (min, max) objects (seed 321); for each scene and
    each named pool, one random question of the pool (its own random stream per call),
    recorded with the pool's name as its family."""
    rng = np.random.default_rng(0)
    out: dict[str, list] = {}
    for e in T.draw(T.Stage(min_objects=objects[0], max_objects=objects[1]), shape, 321, 0, n, split="val"):
        for name, pool in pools(e).items():
            out.setdefault(name, [])
            if pool:
                q = pool[int(rng.integers(len(pool)))]
                out[name].append(
                    dataclasses.replace(e, question=q.question, answer=q.answer, family=name, evidence=q.evidence)
                )
    return out


def _relations(e: Example, axis: str = "") -> list[Question]:
    return [q for q in questions(e.objects, shape.image_size) if q.subtype == "relation" and axis in q.question]


def _left_right_side(e: Example) -> list[Question]:
    return [q for q in side_questions(e.objects, shape.image_size) if q.question.startswith("Left")]


def _off_middle(e: Example) -> str:
    """The distance bin of the asked object's centre from the image's vertical middle (side
    questions ask about centres 12 px or more off it, and centres lie 6 px or more inside)."""
    off = abs(e.objects[e.evidence[0]].center()[0] - shape.image_size / 2)
    return next(f"{lo}-{hi} px" for lo, hi in ((12, 18), (18, 26), (26, 48)) if lo <= off < hi)


asked = ask((2, 4), 300, lambda e: {"side": side_questions(e.objects, shape.image_size), "relation": _relations(e)})
axis = ask((2, 4), 400, lambda e: {"left/right side": _left_right_side(e),
                                   "left/right relation": _relations(e, "left or right"),
                                   "above/below relation": _relations(e, "above or below")})
# one left/right side question per scene of 1-4 objects, labelled with its distance bin
far = [
    dataclasses.replace(e, family=_off_middle(e))
    for e in ask((1, 4), 400, lambda e: {"side": _left_right_side(e)})["side"]
]


for path in args.models:
    model, processor, x = load_with_features(path, images)
    objects = np.stack([patch_targets(e.objects, shape.image_size, shape.patch)[0] > 0 for e in images]).reshape(-1)
    half = len(x) // 2  # fit on the first 100 images' tokens, score on the other 100
    print(path)
    for name, target in (("column", np.arange(grid * grid) % grid), ("row", np.arange(grid * grid) // grid)):
        y = np.tile(target, len(images)).astype(float)
        w = np.linalg.lstsq(x[:half], y[:half], rcond=None)[0]
        err = np.abs(x[half:] @ w - y[half:])
        print(f"  {name}: linear readout error {err.mean():.2f} patches ({err[objects[half:]].mean():.2f} on object "
              f"patches), predicting the mean {np.abs(y[half:] - y[:half].mean()).mean():.2f}")
    for name, items in {**asked, **axis}.items():
        acc = {p: T.first_token_accuracy(model, processor, items, prompt=p)["overall"] for p in ("llava", "bare")}
        print(f"  {name} ({len(items)} questions): LLaVA prompt {acc['llava']:.3f}, bare prompt {acc['bare']:.3f}")
    acc = T.first_token_accuracy(model, processor, far, prompt="bare")
    bins = ", ".join(f"{k} {v:.2f}" for k, v in acc.items() if k != "overall")
    print(
        f"  left/right side, 1-4 objects, bare prompt ({len(far)} questions): "
        f"{acc['overall']:.3f} ({bins} off the middle)"
    )
