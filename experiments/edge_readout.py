"""How well a run's projected image features carry the ``edge_*`` patch targets (the first
object from each side of the image; experiments/log/micro_llava_training.md, session 17): the
auxiliary head saved with each checkpoint (``aux_head.safetensors``, trained with those
targets) read on ``--n`` generated validation images (seed 11), as the recall of the flagged
object patches and of the other object patches. Run from the repository root:

    python experiments/edge_readout.py checkpoints/<run>/stage-<name> --n 256
"""

from pathlib import Path

import torch
from probing import arguments
from transformers import AutoProcessor, LlavaForConditionalGeneration

from redundancy.micro import train as T
from redundancy.micro.model import MicroConfig

TARGETS = ["color", "shape", "glyph", "center", "x", "y", "edge_left", "edge_right", "edge_above", "edge_below"]

args = arguments(threads=2, n=256)
shape = MicroConfig()
examples = T.draw(T.Stage(), shape, 11, 0, args.n, split="val")
for path in args.models:
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    head = T.PatchHead(model.config.text_config.hidden_size, TARGETS)
    if not T.load_aux(Path(path), head):
        raise SystemExit(f"{path} has no auxiliary head trained on {TARGETS}")
    batch = T.vision_batch(processor, examples, shape, TARGETS)
    with torch.no_grad():
        logits = head(model, batch["pixel_values"])
    labels, fg = batch["targets"], batch["targets"][:, 0] > 0
    print(path)
    for i, name in enumerate(TARGETS):
        if name.startswith("edge_"):
            pred = logits[i].argmax(-1)
            flagged, others = fg & (labels[:, i] == 1), fg & (labels[:, i] == 0)
            print(f"  {name}: flagged patches {(pred[flagged] == 1).float().mean():.3f}, "
                  f"other object patches {(pred[others] == 0).float().mean():.3f}")
