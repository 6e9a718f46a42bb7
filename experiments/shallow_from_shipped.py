"""The 4-layer model inside a checkpoint grown with ``identity`` growth (the v22 pair and
earlier): its trained decoder layers (0, 8, 16, 24) kept, the inert identity layers removed, in
float32, written as a training stage directory that ``redundancy.micro.train`` can start from with
``init_from=<out> start_stage=grow8`` (redundancy/conf/train/train.yaml). This stands in for rerunning the
4-layer curriculum (about 100 minutes on the 2-core CPU) when only the growth is redone
(session 20, issue 26).

    python experiments/shallow_from_shipped.py <v22 vanilla dir> checkpoints/v23/stage-neighbor
"""

import sys

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from redundancy.micro.model import shrink

source, out = sys.argv[1], sys.argv[2]
model = LlavaForConditionalGeneration.from_pretrained(source, dtype=torch.float32)
processor = AutoProcessor.from_pretrained(source)
depth = model.config.text_config.num_hidden_layers
model = shrink(model, list(range(0, depth, depth // 4)))
model.save_pretrained(out)
processor.save_pretrained(out)
print(f"{source}: {depth} layers -> {model.config.text_config.num_hidden_layers} (float32) in {out}")
