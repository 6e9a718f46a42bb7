"""Binding probes (experiments/log/micro_llava_training.md, session 4): train the 4-layer
micro-LLaVA on one family of questions from a checkpoint, print first-token validation
accuracy every 50 steps. Run from the repository root, e.g.

    python experiments/binding_probe.py --nosuffix --steps 300 --save probe-bind
    python experiments/binding_probe.py --init probe-bind --steps 400
    python experiments/binding_probe.py --init probe-bind --suffix_sup --nobj 1 --maxobj 6 --minsize 12 --steps 400

--nosuffix uses the bare prompt (redundancy.micro.model.BARE_PROMPT); --mixed trains on half bare,
half LLaVA prompts (evaluated with the LLaVA prompt); --suffix_sup also supervises the
answer at the question's last word, "?" and "ASSISTANT" (Stage.suffix_loss); --invert asks
"what shape is <colour>?"; --qfirst puts the question before the image;
--attn_layer L adds -log(attention mass of the answering position on the asked
object's patches) at layer L (eager attention); --qk scales the q/k projections.
"""
import argparse
import dataclasses
import time

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from redundancy.data import patch_indices
from redundancy.micro import train as T
from redundancy.micro.model import MicroConfig

ap = argparse.ArgumentParser()
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--steps", type=int, default=800)
ap.add_argument("--lr", type=float, default=2e-3)
ap.add_argument("--nobj", type=int, default=2)
ap.add_argument("--maxobj", type=int, default=0)
ap.add_argument("--attn_layer", type=int, default=-1)
ap.add_argument("--attn_w", type=float, default=1.0)
ap.add_argument("--qk", type=float, default=1.0)
ap.add_argument("--minsize", type=int, default=16)
ap.add_argument("--fam", default="color")
ap.add_argument("--init", default="checkpoints/micro-vanilla/stage-vision")
ap.add_argument("--save", default="")
ap.add_argument("--invert", action="store_true")
ap.add_argument("--qfirst", action="store_true")
ap.add_argument("--nosuffix", action="store_true")
ap.add_argument("--mixed", action="store_true")
ap.add_argument("--suffix_sup", action="store_true")
a = ap.parse_args()
PROMPT = "bare" if a.nosuffix else "llava"
TRAIN_PROMPT = "mixed" if a.mixed else PROMPT
if a.qfirst:
    T.format_prompt = lambda q, p="llava": f"USER: {q}\n<image> ASSISTANT:"
def inv(exs):
    out = []
    for e in exs:
        o = e.objects[e.evidence[0]]
        if sum(x.color == o.color for x in e.objects) != 1:
            continue
        out.append(dataclasses.replace(e, question=f"What shape is {o.color}?", answer=o.shape))
    return out
torch.set_num_threads(a.threads)
attn = a.attn_layer >= 0
model = LlavaForConditionalGeneration.from_pretrained(a.init, attn_implementation="eager" if attn else "sdpa")
proc = AutoProcessor.from_pretrained(a.init)
if a.qk != 1.0:
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(a.qk)
            layer.self_attn.k_proj.weight.mul_(a.qk)
shape = MicroConfig()
fam = {f: (1.0 if f in a.fam.split(",") else 0.0) for f in ("color", "reading", "spatial", "count")}
st = T.Stage(
    name="b",
    steps=a.steps,
    layers=4,
    lr=a.lr,
    warmup=50,
    vision_lr_scale=0.1,
    min_objects=a.nobj,
    max_objects=a.maxobj or a.nobj,
    min_size=a.minsize,
    families=fam,
)
val = T.draw(st, shape, 0, 0, 256, split="val")
if a.invert:
    val = inv(val)
opt, params = T.build_optimizer(model, None, st, 0.0)
model.train()
t0 = time.time()
img_id = model.config.image_token_id
for step in range(a.steps):
    for g in opt.param_groups:
        g["lr"] = T.lr_at(st, step) * g["scale"]
    ex = T.draw(st, shape, 2, step, 32)
    if a.invert:
        ex = inv(ex)
    if not attn:
        loss = T.step_loss(model, None, proc, ex, shape, torch.device("cpu"), TRAIN_PROMPT, a.suffix_sup)
        aux = torch.tensor(0.)
    else:
        batch = T.collate(proc, ex, with_answers=True, prompt=PROMPT)
        out = model(**batch, output_attentions=True)
        ids = batch["input_ids"]
        qpos = ids.shape[1] - 3  # last prompt token (predicts the answer)
        A = out.attentions[a.attn_layer][:, :, qpos]  # [B,H,T]
        target = torch.zeros(ids.shape[0], ids.shape[1])
        for b, e in enumerate(ex):
            imgpos = (ids[b] == img_id).nonzero().flatten()
            pats = sorted(
                {
                    p
                    for k in e.evidence
                    for p in patch_indices(
                        (e.objects[k].x, e.objects[k].y, e.objects[k].size), shape.image_size, shape.patch
                    )
                }
            )
            target[b, imgpos[pats]] = 1.0 / len(pats)
        # mass on evidence patches, mean over heads: maximise log of summed attention on evidence
        mass = (A * (target > 0)[:, None]).sum(-1).mean(1)
        aux = -torch.log(mass + 1e-6).mean()
        loss = out.loss + a.attn_w * aux
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad()
    if (step + 1) % 50 == 0:
        acc = T.first_token_accuracy(model, proc, val, prompt=PROMPT)
        if a.save:
            model.save_pretrained(a.save)
            proc.save_pretrained(a.save)
        print(
            step + 1,
            round(loss.item(), 3),
            round(aux.item(), 3),
            {k: round(v, 3) for k, v in acc.items()},
            round(time.time() - t0),
            flush=True,
        )
if a.save:
    model.save_pretrained(a.save)
    proc.save_pretrained(a.save)
