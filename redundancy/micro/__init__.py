"""The micro-LLaVA: the project's model organism, in its own wing (the core never imports it).

- :mod:`redundancy.micro.microvqa`: the synthetic benchmark generator (``python -m redundancy.micro.microvqa``);
- :mod:`redundancy.micro.model`: the model builder and the depth curriculum's grow / shrink;
- :mod:`redundancy.micro.packing`: several questions per image in one training sequence;
- :mod:`redundancy.micro.train`: the training recipe (``python -m redundancy.micro.train``);
- :mod:`redundancy.micro.export`: a trained run as a shipped checkpoint with its card
  (``python -m redundancy.micro.export``).
"""
