"""Does a model's language-model input still carry the glyphs and shapes? (experiments/log/
micro_llava_training.md, session 10). For each model directory, a least-squares linear readout
(one-hot targets, argmax) of each patch's glyph (on the patches a glyph covers) and shape (on
object patches) from the projected image features, fitted on the first 150 of 300 validation
images and scored on the other 150. Run from the repository root:

    python experiments/glyph_probe.py redundancy/assets/checkpoints/micro-llava-vanilla
"""

import numpy as np
from probing import arguments, load_with_features

from redundancy.micro import train as T
from redundancy.micro.microvqa import PATCH_TARGETS, patch_targets
from redundancy.micro.model import MicroConfig

args = arguments(threads=1)
shape = MicroConfig()
images = T.draw(T.Stage(), shape, 5, 0, 300, split="val")
labels = np.stack([patch_targets(e.objects, shape.image_size, shape.patch) for e in images])  # [image, target, patch]


def readout(x: np.ndarray, y: np.ndarray) -> tuple[float, int]:
    """Held-out accuracy of a linear one-hot readout of ``y`` (0 = no label) from ``x``, and
    how many held-out patches it was scored on."""
    half = len(x) // 2  # token rows of the first 150 images
    fit, score = y > 0, y > 0
    fit[half:], score[:half] = False, False
    w = np.linalg.lstsq(x[fit], np.eye(int(y.max()) + 1)[y[fit]], rcond=None)[0]
    return float(((x[score] @ w).argmax(1) == y[score]).mean()), int(score.sum())


for path in args.models:
    _, _, x = load_with_features(path, images)
    scores = {name: readout(x, labels[:, list(PATCH_TARGETS).index(name)].reshape(-1)) for name in ("glyph", "shape")}
    print(path, "linear readout:", ", ".join(f"{k} {a:.3f} (n={n})" for k, (a, n) in scores.items()), flush=True)
