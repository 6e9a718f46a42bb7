"""The lmms-eval model ``redundancy_llava``: a llava-hf checkpoint answering under a drop schedule.

    python -m lmms_eval --model redundancy_llava \\
        --model_args pretrained=path/to/llava-1.5-7b-hf,method=pdrop,lam=0.5 --tasks textvqa_val

Model arguments (``--model_args key=value,...``):

* ``pretrained``: a local HF directory (``LlavaForConditionalGeneration`` or
  ``LlavaNextForConditionalGeneration``) or a shipped checkpoint name, loaded offline by
  :func:`redundancy.loading.load_model`.
* ``method``: ``vanilla`` (default), ``drop`` (``layer``, ``ratio``), ``fastv`` (``K``, ``R``) or
  ``pdrop`` (``layers``, ``lam`` or ``ratios``; lists written ``layers=[8,16,24]``), with the
  options ``ranker``, ``rank_layer``, ``positions``, ``seed``. What is left out keeps the
  :class:`~redundancy.schedule.DropSchedule` builder's default (the method's official
  choice); a key the method does not take is an error, never ignored.
* ``dtype`` (default ``float32`` on CPU, ``bfloat16`` on CUDA), ``attn_implementation``
  (``sdpa``), and lmms-eval's own ``--device`` / ``--batch_size``.

Answers are greedy whatever the task asks for (the study's decoding); ``max_new_tokens``
and the stop strings ``until`` come from the task. The prompt is one user turn in the
checkpoint's chat template (the image placeholders, then the task's text), its family's
default when the processor has none (:mod:`redundancy.prompts`). The schedule's
:meth:`~redundancy.schedule.DropSchedule.record` is logged when the model is built;
lmms-eval keeps the ``model_args`` string in its results (``config.model_args``) and
offers no hook for more.

Failures end the command with a non-zero exit code. lmms-eval's CLI catches every ``Exception``
raised while it evaluates, logs it and exits 0; the plugin therefore raises :class:`PluginError`
(a ``SystemExit``, which passes through): exit code 2 with one ``error:`` line when the model
cannot be built from its arguments (unknown method or argument, layer or ratio out of range, a
missing or broken checkpoint), exit code 1 after the traceback when a request fails.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from loguru import logger
from PIL import Image
from tqdm.auto import tqdm
from transformers import AutoConfig

from redundancy.engine import apply_schedule
from redundancy.evaluate import batches, greedy_answers
from redundancy.lmms import MODEL_NAME
from redundancy.loading import load_model, resolve, resolve_device, resolve_dtype
from redundancy.prompts import render
from redundancy.schedule import METHOD_SPECS, DropSchedule
from redundancy.validate import check_device, check_weights

IMAGE = "<image>"
USAGE, FAILED = 2, 1  # exit codes: bad model arguments or checkpoint | a request failed


class PluginError(SystemExit):
    """Ends lmms-eval with exit code ``code``: a ``SystemExit`` is not an ``Exception``, so
    lmms-eval's catch-all (which logs and exits 0) lets it through."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _usage_error(err: Exception) -> PluginError:
    message = f"{MODEL_NAME}: {err}"
    print(f"error: {message}", file=sys.stderr)
    return PluginError(USAGE, message)


def _request_error(err: Exception, what: str) -> PluginError:
    if isinstance(err, (ValueError, NotImplementedError)):  # a request this model cannot answer
        return _usage_error(err)
    logger.exception(f"{MODEL_NAME}: {what} failed")
    return PluginError(FAILED, f"{MODEL_NAME}: {what} failed: {err!r}")


def schedule_from_args(method: str = "vanilla", **args: Any) -> DropSchedule:
    """The schedule that lmms-eval model arguments name: ``method`` and the fields of its
    :class:`~redundancy.schedule.MethodSpec` (``lam=0.5``: the plugin's arguments are flat, lmms-eval's
    ``key=value`` list); lists may arrive as strings (``"[8,16,24]"``)."""
    if method not in METHOD_SPECS:
        raise ValueError(f"method={method!r} is unknown; choose one of {sorted(METHOD_SPECS)}")
    spec = METHOD_SPECS[method]
    params = [f.name for f in dataclasses.fields(spec) if f.name != "name"]
    unknown = sorted(set(args) - set(params))
    if unknown:
        close = [c for u in unknown for c in difflib.get_close_matches(u, params, n=1)]
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"method={method} takes {params}; unknown argument(s) {unknown}{hint}")
    values = {k: json.loads(v) if isinstance(v, str) and v.startswith("[") else v for k, v in args.items()}
    return DropSchedule.from_spec(spec(**values))


def cut(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


class RedundancyLlava(lmms):
    """A llava-hf checkpoint under a :class:`DropSchedule`, for lmms-eval's image tasks."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        method: str = "vanilla",
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | str = 1,
        attn_implementation: str = "sdpa",
        max_batch_size: int | None = None,  # lmms-eval passes it; batches are fixed-size here
        **method_args: Any,
    ) -> None:
        super().__init__()
        try:
            self._build(pretrained, method, device, dtype, batch_size, attn_implementation, method_args)
        except (ValueError, OSError) as err:  # bad model arguments or checkpoint: one line, exit code 2
            raise _usage_error(err) from err

    def _build(self, pretrained: str, method: str, device: str | None, dtype: str | None, batch_size: int | str,
               attn_implementation: str, method_args: dict[str, Any]) -> None:
        self.schedule = schedule_from_args(method, **method_args)
        device = device or str(resolve_device("auto"))
        check_device(device)
        torch_dtype = resolve_dtype(dtype or "auto", device)
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"batch_size={batch_size!r}: give a number >= 1 (no automatic batch size)")
        self.batch_size_per_gpu = int(batch_size)
        path = resolve(str(pretrained))
        check_weights(path)
        config = AutoConfig.from_pretrained(path)  # the depth, before any weights load
        self.schedule.validate_for(config.get_text_config().num_hidden_layers)
        self.model, self.processor = load_model(
            path, dtype=torch_dtype, device=device, attn_implementation=attn_implementation
        )
        self.processor.tokenizer.padding_side = "left"  # batched generation
        self._warned_sampling = False
        logger.info(f"redundancy schedule: {json.dumps(self.schedule.record())}")

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    # ------------------------------------------------------------------ inputs
    def prompt(self, context: str, n_images: int) -> str:
        """One user turn: the images, then ``context``; a context that carries its own
        ``<image>`` markers keeps the images where it puts them."""
        if IMAGE in context:
            content: list[dict[str, str]] = []
            for i, piece in enumerate(context.split(IMAGE)):
                if i:
                    content.append({"type": "image"})
                if piece.strip():
                    content.append({"type": "text", "text": piece.strip()})
        else:
            content = [{"type": "image"}] * n_images + [{"type": "text", "text": context}]
        return render(self.processor, content)  # its chat template, else its family's default

    def _images(self, doc_to_visual: Callable, doc_id: int, task: str, split: str) -> list[Image.Image]:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        for v in visuals:
            if not isinstance(v, Image.Image):
                raise NotImplementedError(f"task {task}: only image inputs are supported, got {type(v).__name__}")
        return [v.convert("RGB") for v in visuals]

    def _inputs(self, images: list[Image.Image], texts: list[str]) -> Any:
        inputs = self.processor(images=images or None, text=texts, return_tensors="pt", padding=True)
        return inputs.to(self.model.device, self.model.dtype)

    # ---------------------------------------------------------------- requests
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy answers, batched (left padding) among requests with the same task and
        generation settings, returned in request order."""
        try:
            return self._generate_until(requests)
        except Exception as err:
            raise _request_error(err, "generate_until") from err

    def _generate_until(self, requests: list[Instance]) -> list[str]:
        args = [r.args for r in requests]
        groups: dict[str, list[int]] = {}
        for i, (_, gen_kwargs, _, _, task, split) in enumerate(args):
            groups.setdefault(json.dumps([task, split, gen_kwargs], sort_keys=True, default=str), []).append(i)
        answers = [""] * len(args)
        with (
            apply_schedule(self.model, self.schedule, trace=False),
            tqdm(total=len(args), desc="answering", disable=self.rank != 0) as bar,
        ):
            for rows in groups.values():
                for chunk in batches(rows, self.batch_size):
                    for i, answer in zip(chunk, self._generate([args[i] for i in chunk])):
                        answers[i] = answer
                    bar.update(len(chunk))
        return answers

    def _generate(self, chunk: Sequence[tuple]) -> list[str]:
        gen_kwargs: dict[str, Any] = chunk[0][1]
        self._warn_if_sampling(gen_kwargs)
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        images: list[Image.Image] = []
        texts = []
        for context, _, doc_to_visual, doc_id, task, split in chunk:
            visuals = self._images(doc_to_visual, doc_id, task, split)
            images += visuals
            texts.append(self.prompt(context, len(visuals)))
        inputs = self._inputs(images, texts)
        max_new_tokens = int(gen_kwargs.get("max_new_tokens", 1024))  # lmms-eval's llava_hf default
        return [cut(a, until).strip() for a in greedy_answers(self.model, self.processor, inputs, max_new_tokens)]

    def _warn_if_sampling(self, gen_kwargs: dict[str, Any]) -> None:
        sampling = gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature") or 0) > 0
        if (sampling or int(gen_kwargs.get("num_beams") or 1) > 1) and not self._warned_sampling:
            logger.warning(f"the task asks for {gen_kwargs}; redundancy_llava decodes greedily")
            self._warned_sampling = True

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """``(log p(continuation | context, images), continuation is the greedy one)`` under
        the schedule. The context is labelled ``-100`` so the engine ranks with its last
        token, the same query as in generation."""
        try:
            return self._loglikelihood(requests)
        except Exception as err:
            raise _request_error(err, "loglikelihood") from err

    @torch.no_grad()
    def _loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        results = []
        with apply_schedule(self.model, self.schedule, trace=False):
            for context, target, doc_to_visual, doc_id, task, split in (r.args for r in requests):
                continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
                images = self._images(doc_to_visual, doc_id, task, split)
                prompt = self.prompt(context, len(images))
                n_context = self._inputs(images, [prompt])["input_ids"].shape[1]
                inputs = self._inputs(images, [prompt + continuation])
                ids = inputs["input_ids"]
                labels = ids.clone()
                labels[:, :n_context] = -100
                logits = self.model(**inputs, labels=labels).logits[0, n_context - 1 : -1].float()  # [cont, vocab]
                wanted = ids[0, n_context:]
                logprob = F.log_softmax(logits, dim=-1).gather(1, wanted[:, None]).sum()
                results.append((float(logprob), bool((logits.argmax(-1) == wanted).all())))
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise _usage_error(NotImplementedError("answers single-round tasks only"))
