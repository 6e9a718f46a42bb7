"""The engine keeps the Hugging Face model contract (issue 27), per family.

Under ``apply_schedule`` the model accepts every input and returns every output the
unmodified model does: at keep ratio 1 each output equals the unmodified model's, and
under drops it follows docs/method.md section 9. One tester class per family (a tiny
random config of the real HF class, eager attention so attentions are returned), like
transformers' own model tests: a new family is one small subclass that builds a sample.

Cases (issue 27): 1 hidden states / attentions (forward and ``generate``'s dict outputs),
2 packed padding-free rows, 3 gradient checkpointing with ``backward()`` after the block,
4 padding slots and per-layer cache lengths, 5 text-only rows, ``inputs_embeds``, a prompt
ending on an image token, a cache the engine did not prefill.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from redundancy.engine import apply_schedule
from redundancy.models import adapter_for
from redundancy.models.factory import build_model, tiny_config
from redundancy.schedule import DropSchedule, kept_count
from tests.helpers import n_image_tokens

Sample = dict[str, torch.Tensor]
KEEP_ALL = DropSchedule.drop(layer=2, ratio=1.0, ranker="last", rank_layer="stage_last")
DROP = DropSchedule.drop(layer=2, ratio=0.5, ranker="last", rank_layer="stage_last")
PYRAMID = DropSchedule.pdrop(layers=(1, 3), lam=0.5)
TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")  # per-token inputs, left-padded
_MODELS: dict[tuple[str, str], Any] = {}


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, atol=tol, rtol=0)


def collate(samples: list[Sample]) -> Sample:
    """A left-padded batch (pad id 0) of single samples; the images of the rows that have one, in row order."""
    width = max(s["input_ids"].shape[1] for s in samples)
    out: Sample = {}
    for key in TOKEN_KEYS:
        if key in samples[0]:
            out[key] = torch.cat([F.pad(s[key], (width - s[key].shape[1], 0)) for s in samples])
    images = [s for s in samples if "pixel_values" in s]
    if images:
        pixels = [s["pixel_values"] for s in images]
        if pixels[0].dim() == 5:  # LLaVA-NeXT: [1, crops, 3, s, s], crops per image differ
            most = max(p.shape[1] for p in pixels)
            pixels = [F.pad(p, (0, 0, 0, 0, 0, 0, 0, most - p.shape[1])) for p in pixels]
        out["pixel_values"] = torch.cat(pixels)
        for key in ("image_sizes", "image_grid_thw"):
            if key in images[0]:
                out[key] = torch.cat([s[key] for s in images])
    return out


def layer_lengths(cache: DynamicCache) -> list[int]:
    return [layer.keys.shape[2] for layer in cache.layers]


class EngineContractTests:
    """The contract, run on the family a subclass names (``family``) with the samples it builds."""

    family: ClassVar[str]

    # ------------------------------------------------------------- family hooks
    def model(self) -> Any:
        """Cached tiny model with eager attention (do not mutate)."""
        key = (self.family, "eager")
        if key not in _MODELS:
            _MODELS[key] = build_model(tiny_config(self.family), attn_implementation="eager")
        return _MODELS[key]

    def sample(self, pre: int, post: int, seed: int, image: bool = True) -> Sample:
        """One prompt: ``pre`` text tokens, the image (if ``image``), ``post`` text tokens."""
        raise NotImplementedError

    def ends_with_image(self, seed: int) -> Sample:
        """A prompt whose last token is an image token."""
        return self.sample(3, 0, seed)

    def packed(self, samples: list[Sample]) -> Sample:
        """``samples`` packed into one row, positions restarting at each (no padding mask)."""
        out = {k: v for k, v in collate(samples).items() if k not in TOKEN_KEYS}
        out["input_ids"] = torch.cat([s["input_ids"] for s in samples], dim=1)
        out["position_ids"] = torch.cat([torch.arange(s["input_ids"].shape[1]) for s in samples])[None]
        return out

    def turn_positions(self, full: Sample, q: int) -> torch.Tensor | None:
        """Position ids of the last ``q`` tokens of ``full`` when a plain forward after a cache
        does not find them itself (``None``: it does)."""
        return None

    def text(self, gen: torch.Generator, n: int) -> list[int]:
        return torch.randint(3, self.model().config.text_config.vocab_size - 4, (n,), generator=gen).tolist()

    # ------------------------------------------------------------------ helpers
    def batch(self) -> Sample:
        return collate([self.sample(3, 5, seed=1), self.sample(1, 3, seed=2)])

    def run(self, schedule: DropSchedule | None, inputs: Sample, **kwargs: Any) -> Any:
        model = self.model()
        with torch.no_grad():
            if schedule is None:
                return model(**inputs, **kwargs)
            with apply_schedule(model, schedule):
                return model(**inputs, **kwargs)

    # ------------------------------------------- case 1: hidden states, attentions
    def test_hidden_states_and_attentions_keep_all(self) -> None:
        batch = self.batch()
        ref = self.run(None, batch, output_hidden_states=True, output_attentions=True)
        out = self.run(KEEP_ALL, batch, output_hidden_states=True, output_attentions=True)
        layers = self.model().config.text_config.num_hidden_layers
        assert out.hidden_states is not None and len(out.hidden_states) == layers + 1
        assert out.attentions is not None and len(out.attentions) == layers
        for a, b in zip(out.hidden_states, ref.hidden_states):
            close(a, b)
        for a, b in zip(out.attentions, ref.attentions):
            close(a, b)

    @pytest.mark.parametrize("mode", ["greedy", "sample", "beam"])
    def test_generate_dict_outputs_keep_all(self, mode: str) -> None:
        model = self.model()
        batch = self.batch()
        opts = {
            "greedy": {"do_sample": False}, "sample": {"do_sample": True, "top_k": 5},
            "beam": {"do_sample": False, "num_beams": 2},
        }[mode]
        kwargs = dict(
            max_new_tokens=3, eos_token_id=None, pad_token_id=0, return_dict_in_generate=True, output_scores=True,
            output_hidden_states=True, output_attentions=True, **opts,
        )
        with torch.no_grad():
            torch.manual_seed(0)
            ref = model.generate(**batch, **kwargs)
            with apply_schedule(model, KEEP_ALL):
                torch.manual_seed(0)
                out = model.generate(**batch, **kwargs)
        assert torch.equal(out.sequences, ref.sequences)
        for name in ("hidden_states", "attentions"):
            got, want = getattr(out, name), getattr(ref, name)
            assert got is not None and len(got) == len(want) == 3, name
            for step_got, step_want in zip(got, want):
                assert len(step_got) == len(step_want)
                for a, b in zip(step_got, step_want):
                    close(a, b)
        for a, b in zip(out.scores, ref.scores):
            close(a, b, 1e-4)

    def test_hidden_states_and_attentions_under_drops(self) -> None:
        """Hidden states: every layer at the prompt's positions, dropped image tokens zero from
        the boundary on; attentions over the slots each stage kept (``trace.slots``)."""
        model = self.model()
        batch = self.batch()
        ref = self.run(None, batch, output_hidden_states=True, output_attentions=True)
        with torch.no_grad(), apply_schedule(model, DROP) as trace:
            out = model(**batch, output_hidden_states=True, output_attentions=True)
        b, length = batch["input_ids"].shape
        image = batch["input_ids"] == model.config.image_token_id
        kept = torch.zeros_like(image)
        for row in range(b):
            where = image[row].nonzero().flatten()
            kept[row, where[trace.boundaries[0].kept[row]]] = True
        dropped = image & ~kept
        assert dropped.any()
        for i, h in enumerate(out.hidden_states):
            assert h.shape == (b, length, model.config.text_config.hidden_size)
            if i <= 2:  # the embeddings and layers 0..1 saw every token
                close(h, ref.hidden_states[i])
            else:
                assert torch.all(h[dropped] == 0) and bool((h[kept].abs().sum(-1) > 0).all())
        kv = [trace.slots[0].shape[1]] * 2 + [trace.slots[1].shape[1]] * 2
        assert trace.slots[1].shape[1] < length
        for li, att in enumerate(out.attentions):
            assert att.shape[-2:] == (kv[li], kv[li])
            if li < 2:
                close(att, ref.attentions[li])
        for row in range(b):  # slots map stage 1 back to the prompt: the kept tokens and the text
            slot = trace.slots[1][row]
            present = batch["attention_mask"][row].bool() & ~dropped[row]
            assert set(slot[slot >= 0].tolist()) == set(present.nonzero().flatten().tolist())

    def test_generate_dict_outputs_under_drops(self) -> None:
        """``generate``: the prefill step as a forward under drops; each decode step's attentions
        over the stage's cache (its kept slots plus the tokens decoded so far)."""
        model = self.model()
        batch = self.batch()
        b, length = batch["input_ids"].shape
        with torch.no_grad(), apply_schedule(model, DROP) as trace:
            out = model.generate(
                **batch, max_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=0,
                return_dict_in_generate=True, output_hidden_states=True, output_attentions=True,
            )
        d = model.config.text_config.hidden_size
        kv = [length, length, trace.slots[1].shape[1], trace.slots[1].shape[1]]
        assert kv[2] < length
        for step, (states, attentions) in enumerate(zip(out.hidden_states, out.attentions)):
            q = length if step == 0 else 1
            assert [h.shape for h in states] == [(b, q, d)] * (len(kv) + 1)
            assert [a.shape[-2:] for a in attentions] == [(n if step == 0 else 1, n + step) for n in kv]

    def test_next_token_logits_go_back_only_for_the_last_token(self) -> None:
        """``logits_to_keep=1`` (as ``generate`` prefills): the language model hands back the last
        token's state only, and the logits equal the last row of the full-length forward's."""
        model = self.model()
        batch = self.batch()
        lengths: list[int] = []
        hook = adapter_for(model).language_model.register_forward_hook(
            lambda module, args, out: lengths.append(out.last_hidden_state.shape[1]))
        try:
            full = self.run(PYRAMID, batch)
            last = self.run(PYRAMID, batch, logits_to_keep=1)
        finally:
            hook.remove()
        assert lengths == [batch["input_ids"].shape[1], 1]
        close(last.logits, full.logits[:, -1:])

    # ----------------------------------------------- case 4: padding and caches
    def test_padding_and_cache_lengths_keep_all(self) -> None:
        batch = self.batch()
        assert not batch["attention_mask"].bool().all()
        ref = self.run(None, batch, use_cache=True)
        out = self.run(KEEP_ALL, batch, use_cache=True)
        assert layer_lengths(out.past_key_values) == layer_lengths(ref.past_key_values)
        close(out.logits, ref.logits)  # padding positions included

    # ------------------------------------------------ case 5: inputs it accepts
    @pytest.mark.parametrize("ranker", ["last", "uniform", "random"])
    def test_text_only_row_passes_through(self, ranker: str) -> None:
        model = self.model()
        schedule = DropSchedule.drop(layer=2, ratio=0.5, ranker=ranker)
        samples = [self.sample(3, 5, seed=1), self.sample(4, 6, seed=2, image=False)]
        batch = collate(samples)
        valid = batch["attention_mask"].bool()
        ref = self.run(None, batch)
        alone = self.run(schedule, collate(samples[:1]))
        with torch.no_grad(), apply_schedule(model, schedule) as trace:
            out = model(**batch)
        close(out.logits[1][valid[1]], ref.logits[1][valid[1]])
        close(out.logits[0][valid[0]], alone.logits[0], 1e-4)
        n = trace.n_image[0]
        assert trace.kept_counts() == [[n, kept_count(n, 0.5)], [0, 0]] and trace.untouched == [False, True]

    def test_inputs_embeds_use_the_placeholder_mask(self) -> None:
        """``inputs_embeds`` instead of ``input_ids``: the engine finds the image tokens by the
        model's own placeholder rule, so it drops the same tokens."""
        model = self.model()
        batch = self.batch()
        embeds = model.get_input_embeddings()(batch["input_ids"])
        by_embeds = {k: v for k, v in batch.items() if k != "input_ids"} | {"inputs_embeds": embeds}
        vanilla = self.run(None, by_embeds).logits
        close(self.run(KEEP_ALL, by_embeds).logits, vanilla)
        with torch.no_grad(), apply_schedule(model, DROP) as trace:
            ref = model(**batch).logits
            kept, n_image = [k.clone() for k in trace.boundaries[0].kept], trace.n_image
            out = model(**by_embeds).logits
        assert trace.n_image == n_image and trace.kept_counts() == [list(DROP.stage_counts(n)) for n in n_image]
        if torch.allclose(vanilla, self.run(None, batch).logits, atol=1e-5):
            # The unmodified model reads both inputs alike (Qwen2-VL without input_ids has no 3-D positions).
            close(out, ref)
            for a, b in zip(trace.boundaries[0].kept, kept):
                assert torch.equal(a, b)
            kwargs = dict(max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
            with torch.no_grad(), apply_schedule(model, DROP):
                by_ids = model.generate(**batch, **kwargs)[:, -4:]
                assert torch.equal(model.generate(**by_embeds, **kwargs), by_ids)

    def test_prompt_ending_on_an_image_token(self) -> None:
        """Attention ranking has no query after the image: that row keeps every image token
        (as the unmodified model); the random control still drops."""
        model = self.model()
        sample = self.ends_with_image(seed=3)
        assert sample["input_ids"][0, -1] == model.config.image_token_id
        ref = self.run(None, sample)
        with torch.no_grad(), apply_schedule(model, DROP) as trace:
            out = model(**sample)
        close(out.logits, ref.logits)
        assert trace.untouched == [True]
        with torch.no_grad(), apply_schedule(model, DropSchedule.drop(layer=2, ratio=0.5, ranker="random")) as trace:
            model(**sample)
        n = trace.n_image[0]
        assert trace.kept_counts() == [[n, kept_count(n, 0.5)]]

    def second_turn(self, batch: Sample, seed: int) -> tuple[Sample, Sample]:
        """Four more text tokens per row: the whole sequence, and the forward inputs for those
        tokens alone after the prompt is cached (as HF's ``generate`` feeds a new turn)."""
        gen = torch.Generator().manual_seed(seed)
        turn = torch.tensor([self.text(gen, 4), self.text(gen, 4)])
        full = dict(batch, input_ids=torch.cat([batch["input_ids"], turn], 1),
                    attention_mask=F.pad(batch["attention_mask"], (0, 4), value=1))
        step = {"input_ids": turn, "attention_mask": full["attention_mask"]}
        if "mm_token_type_ids" in batch:
            full["mm_token_type_ids"] = F.pad(batch["mm_token_type_ids"], (0, 4))
            step["mm_token_type_ids"] = torch.zeros_like(turn, dtype=torch.int)
        position_ids = self.turn_positions(full, turn.shape[1])
        if position_ids is not None:
            step["position_ids"] = position_ids
        return full, step

    def test_continuing_a_cache_the_engine_did_not_prefill(self) -> None:
        """A turn prefilled by the unmodified model continues as the unmodified model."""
        model = self.model()
        batch = self.batch()
        full, step = self.second_turn(batch, seed=5)
        with torch.no_grad():
            ref = model(**full).logits[:, -4:]
            cache = DynamicCache(config=model.config.text_config)
            model(**batch, past_key_values=cache)
            with apply_schedule(model, DROP):
                out = model(**step, past_key_values=cache).logits
        close(out, ref, 1e-4)

    def test_later_turn_keeps_the_first_turns_drops(self) -> None:
        """A later turn continues each stage's cache and is never ranked: with a query-free
        ranker (``uniform``) the first turn keeps the same tokens as one prefill of both turns,
        so the later turn's logits equal that prefill's."""
        model = self.model()
        batch = self.batch()
        schedule = DropSchedule.pdrop(layers=(1, 3), lam=0.5, ranker="uniform")
        full, step = self.second_turn(batch, seed=6)
        with torch.no_grad(), apply_schedule(model, schedule) as trace:
            ref = model(**full).logits[:, -4:]
            kept = [k.clone() for b in trace.boundaries for k in b.kept]
            cache = DynamicCache(config=model.config.text_config)
            model(**batch, past_key_values=cache)
            assert all(torch.equal(a, k) for a, k in zip(kept, [k for b in trace.boundaries for k in b.kept]))
            out = model(**step, past_key_values=cache).logits
        close(out, ref, 1e-4)

    def test_cache_of_a_detached_engine_is_refused(self) -> None:
        model = self.model()
        batch = self.batch()
        cache = DynamicCache(config=model.config.text_config)
        with torch.no_grad():
            with apply_schedule(model, DROP):
                model(**batch, past_key_values=cache)
            assert len(set(layer_lengths(cache))) > 1
            mask = F.pad(batch["attention_mask"], (0, 1), value=1)
            step = {"input_ids": torch.tensor([[5], [6]]), "attention_mask": mask}
            with apply_schedule(model, DROP), pytest.raises(ValueError, match="layers hold different lengths"):
                model(**step, past_key_values=cache)

    # ------------------------------------------------------ case 2: packed rows
    @pytest.mark.parametrize("schedule", [KEEP_ALL, PYRAMID], ids=["keep-all", "pyramid"])
    def test_packed_rows_drop_per_segment(self, schedule: DropSchedule) -> None:
        model = self.model()
        samples = [self.sample(3, 5, seed=1), self.sample(2, 4, seed=2)]
        packed = self.packed(samples)
        cut = samples[0]["input_ids"].shape[1]
        with torch.no_grad():
            with apply_schedule(model, schedule) as trace:
                first = model(**samples[0], use_cache=False).logits[0]
                kept = [[b.kept[0] for b in trace.boundaries]]
                second = model(**samples[1], use_cache=False).logits[0]
                kept.append([b.kept[0] for b in trace.boundaries])
            with apply_schedule(model, schedule) as trace:
                out = model(**packed, use_cache=False).logits[0]
        close(out[:cut], first, 1e-4)
        close(out[cut:], second, 1e-4)
        for segment, alone in enumerate(kept):
            assert all(torch.equal(b.kept[segment], k) for b, k in zip(trace.boundaries, alone))
        assert trace.segments == [(0, 0, cut), (0, cut, out.shape[0])]
        n_image = [int((s["input_ids"] == model.config.image_token_id).sum()) for s in samples]
        assert trace.kept_counts() == [list(schedule.stage_counts(n)) for n in n_image]

    # --------------------------------------------- case 3: gradient checkpointing
    def test_gradient_checkpointing_backward_after_the_block(self) -> None:
        """Checkpointed layers recompute in ``backward()``, after the engine is detached: the
        gradients equal those of the same forward without checkpointing."""
        grads = []
        for checkpointing in (False, True):
            model = build_model(tiny_config(self.family), seed=1).train()
            if checkpointing:
                model.activation_checkpointing_enable({"use_reentrant": False})
            inputs = self.sample(3, 5, seed=1)
            labels = inputs["input_ids"].clone()
            labels[:, :-3] = -100  # the answer: the last three tokens
            with apply_schedule(model, DROP):
                loss = model(**inputs, labels=labels).loss
            loss.backward()
            grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        assert grads[1].keys() == grads[0].keys() and grads[0]
        for name, g in grads[0].items():
            close(grads[1][name], g, 1e-6)


class TestLlava(EngineContractTests):
    family = "llava"

    def sample(self, pre: int, post: int, seed: int, image: bool = True) -> Sample:
        model = self.model()
        gen = torch.Generator().manual_seed(seed)
        text = self.text(gen, pre + post)
        n = n_image_tokens(model) if image else 0
        ids = torch.tensor([[*text[:pre], *[model.config.image_token_id] * n, *text[pre:]]])
        out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if image:
            size = model.config.vision_config.image_size
            out["pixel_values"] = torch.randn(1, 3, size, size, generator=gen)
        return out


class TestLlavaNext(TestLlava):
    """Any-res crops and the image newline: rows hold different image-token counts."""

    family = "llava_next"
    SIZES = [(28, 56), (56, 56), (56, 28), (40, 60)]

    def sample(self, pre: int, post: int, seed: int, image: bool = True) -> Sample:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        model = self.model()
        cfg = model.config
        gen = torch.Generator().manual_seed(seed)
        text = self.text(gen, pre + post)
        hw = self.SIZES[seed % len(self.SIZES)]
        n = n_image_tokens(model, hw) if image else 0
        ids = torch.tensor([[*text[:pre], *[cfg.image_token_id] * n, *text[pre:]]])
        out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if image:
            size = cfg.vision_config.image_size
            crops = image_size_to_num_patches(hw, cfg.image_grid_pinpoints, size)
            out["pixel_values"] = torch.randn(1, crops, 3, size, size, generator=gen)
            out["image_sizes"] = torch.tensor([hw])
        return out


class TestQwen2VL(EngineContractTests):
    """Multimodal rotary positions; ``<|vision_start|>`` image ``<|vision_end|>``."""

    family = "qwen2_vl"
    GRIDS = [(4, 4), (4, 6), (6, 4)]

    def sample(self, pre: int, post: int, seed: int, image: bool = True) -> Sample:
        cfg = self.model().config
        gen = torch.Generator().manual_seed(seed)
        text = self.text(gen, pre + post)
        h, w = self.GRIDS[seed % len(self.GRIDS)]
        n = h * w // cfg.vision_config.spatial_merge_size**2
        span = [cfg.vision_start_token_id, *[cfg.image_token_id] * n, cfg.vision_end_token_id] if image else []
        ids = torch.tensor([[1, *text[:pre], *span, *text[pre:]]])
        out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        out["mm_token_type_ids"] = (ids == cfg.image_token_id).int()
        if image:
            vc = cfg.vision_config
            patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
            out["pixel_values"] = torch.randn(h * w, patch_dim, generator=gen)
            out["image_grid_thw"] = torch.tensor([[1, h, w]])
        return out

    def ends_with_image(self, seed: int) -> Sample:
        out = self.sample(3, 0, seed)
        return {k: v[:, :-1] if k in TOKEN_KEYS else v for k, v in out.items()}

    def turn_positions(self, full: Sample, q: int) -> torch.Tensor | None:
        model = self.model()
        args = (full["input_ids"], full["mm_token_type_ids"], full["image_grid_thw"])
        return model.model.get_rope_index(*args, attention_mask=full["attention_mask"])[0][:, :, -q:]

    def packed(self, samples: list[Sample]) -> Sample:
        """HF's packed form for Qwen2-VL: each sample's 3-D positions (``get_rope_index``)
        under a restarting 1-D text row, ``[4, 1, n]``."""
        model = self.model()
        out = super().packed(samples)
        rope = [model.model.get_rope_index(s["input_ids"], s["mm_token_type_ids"], s["image_grid_thw"])[0]
                for s in samples]
        out["position_ids"] = torch.cat([out["position_ids"][None], torch.cat(rope, dim=2)])
        out["mm_token_type_ids"] = torch.cat([s["mm_token_type_ids"] for s in samples], dim=1)
        return out


class TestQwen25VL(TestQwen2VL):
    family = "qwen2_5_vl"
