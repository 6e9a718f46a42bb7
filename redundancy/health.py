"""Layer health: does every decoder layer of a checkpoint do work?

    python -m redundancy.health model=micro-llava-vanilla          # -> results/health/micro-llava-vanilla.{md,json,png}
    python -m redundancy.health model=path/to/llava-1.5-7b-hf n=100 device=cuda dtype=bfloat16

A layer-dropping study is only about depth if the layers along its axis work. Per decoder layer,
on the first ``n`` held-out questions, with hooks on the unmodified Hugging Face model (no engine,
eager attention, so this is also a check on real checkpoints):

- ``update``: the relative residual update ``||h_out - h_in|| / ||h_in||`` over the prompt's
  tokens (padding excluded), averaged over the questions;
- ``kl``: the mean ``KL(full || layer skipped)`` of the next-token distribution at the answering
  position (the last prompt token), the layer replaced by the identity;
- ``changed``: the share of greedy answers that change when the layer is skipped;
- ``entropy``: the entropy of the answering position's attention over the image tokens (heads
  averaged, as the ``last`` ranking score averages them; renormalised over the image tokens),
  divided by ``log(image tokens)``: 1 is uniform attention.

A layer is **inert** when skipping it changes no answer and its ``kl`` is below
:data:`INERT_KL` (issue 26's definition). :func:`layer_health` computes the table; the model
cards of the shipped checkpoints carry it and ``tests/test_shipped.py`` checks them against it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig
from PIL import Image
from tqdm.auto import tqdm

from redundancy.cli import launch, run_entry
from redundancy.data import Sample, load_dataset
from redundancy.evaluate import batches, prompts
from redundancy.loading import TEST_SET, load_model, resolve, resolve_device, resolve_dtype
from redundancy.results import checkpoint_fingerprint
from redundancy.validate import check_device, check_threads, check_writable

HEALTH_N = 200  # questions of the held-out test set the model cards measure layer health on
INERT_KL = 1e-3  # a layer whose skip changes no answer and moves the answer's distribution less than this is inert


@dataclass
class LayerHealth:
    layer: int
    update: float  # mean relative residual update ||h_out - h_in|| / ||h_in||
    kl: float  # mean KL(full || skipped) at the answering position, nats
    changed: float  # share of greedy answers changed by skipping the layer
    entropy: float  # normalised entropy of the answering position's attention over image tokens (1 = uniform)

    @property
    def inert(self) -> bool:
        return self.changed == 0 and self.kl < INERT_KL


def decoder_layers(model: Any) -> torch.nn.ModuleList:
    """The language model's decoder layers of a LLaVA-family model."""
    return model.model.language_model.layers


@contextmanager
def skipped(model: Any, index: int) -> Iterator[None]:
    """Decoder layer ``index`` replaced by the identity: it still runs (so its cache slot is
    written and the cache keeps its length), but its output is its input."""

    def identity(module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = decoder_layers(model)[index].register_forward_hook(identity, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def residual_norms(model: Any, valid: torch.Tensor, sink: list[list[torch.Tensor]]) -> Iterator[None]:
    """Record per layer and sample ``||h_out - h_in|| / ||h_in||`` over the ``valid`` tokens."""

    def recorder(i: int) -> Any:
        def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
            h_in = (args[0] if args else kwargs["hidden_states"]).float()
            h_out = (output[0] if isinstance(output, tuple) else output).float()
            mask = valid[:, :, None].to(h_in.dtype)
            num = ((h_out - h_in) * mask).flatten(1).norm(dim=1)
            den = (h_in * mask).flatten(1).norm(dim=1)
            sink[i].append((num / den).cpu())

        return hook

    handles = [
        layer.register_forward_hook(recorder(i), with_kwargs=True) for i, layer in enumerate(decoder_layers(model))
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def attention_entropy(attentions: Sequence[torch.Tensor], image: torch.Tensor) -> torch.Tensor:
    """``[layers, batch]``: the normalised entropy of the last position's head-averaged attention
    over the image tokens (``image``: ``[batch, seq]`` bool), renormalised over them."""
    out = []
    for att in attentions:
        row = att[:, :, -1, :].float().mean(dim=1)  # [batch, seq]
        per = []
        for b in range(row.shape[0]):
            p = row[b][image[b]]
            p = p / p.sum().clamp_min(1e-30)
            ent = -(p * p.clamp_min(1e-30).log()).sum()
            per.append(ent / math.log(p.numel()))
        out.append(torch.stack(per))
    return torch.stack(out)


def answer(model: Any, processor: Any, inputs: Any, max_new_tokens: int) -> tuple[list[str], torch.Tensor]:
    """Greedy answers of a left-padded batch (decoded and stripped, as
    :func:`redundancy.evaluate.greedy_answers`) and the raw logits of their first token."""
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True,
                         output_logits=True)
    new = out.sequences[:, inputs["input_ids"].shape[1] :]
    return [a.strip() for a in processor.tokenizer.batch_decode(new, skip_special_tokens=True)], out.logits[0]


@torch.no_grad()
def layer_health(
    model: Any, processor: Any, samples: Sequence[Sample], *, batch_size: int = 16, max_new_tokens: int = 4,
    progress: bool = True,
) -> list[LayerHealth]:
    """The health table of ``model`` (eager attention) on ``samples``; see the module's docstring."""
    model.eval()
    depth = len(decoder_layers(model))
    image_id = model.config.image_token_id
    updates: list[list[torch.Tensor]] = [[] for _ in range(depth)]
    kls: list[list[torch.Tensor]] = [[] for _ in range(depth)]
    changed: list[list[bool]] = [[] for _ in range(depth)]
    entropies: list[torch.Tensor] = []
    chunks = list(batches(samples, batch_size))
    bar = tqdm(total=len(chunks) * (depth + 1), desc="layer health", disable=not progress)
    for chunk in chunks:
        images = [Image.open(s.image_path).convert("RGB") for s in chunk]
        inputs = processor(images=images, text=prompts(processor, chunk), return_tensors="pt", padding=True)
        inputs = inputs.to(model.device)
        valid = inputs["attention_mask"].bool()
        with residual_norms(model, valid, updates):
            full = model(**inputs, output_attentions=True)
        entropies.append(attention_entropy(full.attentions, inputs["input_ids"] == image_id))
        logp = full.logits[:, -1].float().log_softmax(-1)
        answers, _ = answer(model, processor, inputs, max_new_tokens)
        bar.update()
        for i in range(depth):
            with skipped(model, i):
                skipped_answers, first = answer(model, processor, inputs, max_new_tokens)
            logq = first.float().log_softmax(-1)
            kls[i].append((logp.exp() * (logp - logq)).sum(-1).cpu())
            changed[i] += [a != b for a, b in zip(answers, skipped_answers)]
            bar.update()
    bar.close()
    entropy = torch.cat(entropies, dim=1).mean(dim=1)
    return [
        LayerHealth(i, torch.cat(updates[i]).mean().item(), torch.cat(kls[i]).mean().item(),
                    sum(changed[i]) / len(changed[i]), entropy[i].item())
        for i in range(depth)
    ]


def inert_layers(table: Sequence[LayerHealth]) -> list[int]:
    return [row.layer for row in table if row.inert]


def markdown(table: Sequence[LayerHealth], n: int) -> str:
    inert = inert_layers(table)
    lines = [
        f"Layer health on {n} held-out questions (`redundancy.health`): relative residual update, mean KL "
        f"at the answer with the layer skipped, answers changed by skipping it, attention entropy of the "
        f"answering position over image tokens (1 = uniform). Inert (no answer changed and KL < {INERT_KL:g}): "
        f"{inert if inert else 'none'}.",
        "",
        "| layer | update | KL skipped | answers changed % | attention entropy | inert |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {r.layer} | {r.update:.3g} | {r.kl:.3g} | {100 * r.changed:.1f} | {r.entropy:.3f} | "
              f"{'yes' if r.inert else ''} |" for r in table]
    return "\n".join(lines) + "\n"


def figure(table: Sequence[LayerHealth], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [r.layer for r in table]
    panels = [("relative update", [r.update for r in table], True),
              ("KL with the layer skipped", [max(r.kl, 1e-8) for r in table], True),
              ("answers changed %", [100 * r.changed for r in table], False),
              ("attention entropy (1 = uniform)", [r.entropy for r in table], False)]
    fig, axes = plt.subplots(2, 2, figsize=(7.0, 4.6), sharex=True, constrained_layout=True)
    for ax, (name, values, log) in zip(axes.flat, panels):
        ax.bar(layers, values, color=["#d55e00" if r.inert else "#0072b2" for r in table])
        ax.set_title(name, fontsize=9)
        if log:
            ax.set_yscale("log")
        if name.startswith("KL"):
            ax.axhline(INERT_KL, color="black", lw=0.8, ls="--")
        ax.tick_params(labelsize=8)
    for ax in axes[1]:
        ax.set_xlabel("decoder layer", fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=150, metadata={"Software": None})
    plt.close(fig)


@dataclass
class HealthConfig:
    model: str = "micro-llava-vanilla"  # a shipped checkpoint name or a local HF directory
    data: str | None = None  # null: the shipped microvqa test set
    n: int = HEALTH_N  # the first n questions
    batch_size: int = 16
    dtype: str = "float32"
    device: str = "auto"
    out: str = "results/health"  # <out>/<model name>.{md,json,png}
    threads: int = 0


ConfigStore.instance().store(name="health_schema", node=HealthConfig)


def health_record(model_name: str | Path, samples: Sequence[Sample], *, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu", batch_size: int = 16) -> dict[str, Any]:
    """The layer-health record of a checkpoint (what ``results/health/<name>.json`` and the model
    cards hold): its name, content fingerprint, ``n``, the inert layers and every layer's row."""
    model, processor = load_model(model_name, dtype=dtype, device=device, attn_implementation="eager")
    table = layer_health(model, processor, samples, batch_size=batch_size)
    path = resolve(model_name)
    return {"model": path.name, "fingerprint": checkpoint_fingerprint(path), "n": len(samples), "inert_kl": INERT_KL,
            "inert": inert_layers(table), "layers": [asdict(r) for r in table]}


def table_of(record: dict[str, Any]) -> list[LayerHealth]:
    return [LayerHealth(**row) for row in record["layers"]]


def run(cfg: HealthConfig) -> str:
    if cfg.n < 1:
        raise ValueError(f"n={cfg.n} must be at least 1")
    check_threads(cfg.threads)
    check_device(cfg.device)
    check_writable(cfg.out, "out")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    samples = load_dataset(cfg.data or TEST_SET)[: cfg.n]
    device = resolve_device(cfg.device)
    record = health_record(cfg.model, samples, dtype=resolve_dtype(cfg.dtype, device), device=device,
                           batch_size=cfg.batch_size)
    return write_report(record, Path(cfg.out))


def write_report(record: dict[str, Any], out: Path) -> str:
    """``<out>/<model>.{json,md,png}`` from a health record (the command's, or a model card's
    ``layer_health``); returns the markdown table."""
    name, n = record["model"], record["n"]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    text = markdown(table_of(record), n)
    (out / f"{name}.md").write_text(f"# Layer health: {name} ({record['fingerprint']})\n\n{text}")
    figure(table_of(record), f"{name} ({record['fingerprint']}): layer health on {n} held-out questions",
           out / f"{name}.png")
    return text


@hydra.main(version_base="1.3", config_path="conf/health", config_name="health")
def main(cfg: DictConfig) -> None:
    run_entry(run, cfg)


if __name__ == "__main__":
    launch(main, "health")
