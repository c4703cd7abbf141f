"""An lm-evaluation-harness model for llmjax checkpoints, registered as `llmjax`.

    import lm_eval, llmjax.harness
    lm = llmjax.harness.LlmjaxLM(checkpoint="runs/NAME", batch_size=16, dtype="bfloat16")
    lm_eval.simple_evaluate(model=lm, tasks=["hellaswag", "arc_easy"])
    # or, after `import llmjax.harness`: simple_evaluate(model="llmjax", model_args="checkpoint=runs/NAME")

- `loglikelihood` / `loglikelihood_rolling`: llmjax.scoring (requests sorted by length, fixed-size
  batches padded to length buckets, one jitted forward per bucket; a score never depends on the
  batch size beyond float rounding);
- `generate_until`: the jitted KV-cache sampler (llmjax.sample), greedy unless the request asks to
  sample, then with its temperature, top_p and top_k, top_k 50 where it gives none (as lm-eval's HF
  model samples: Hugging Face's default; 0 is every token); the text is cut at the first stop string, and at most `max_gen_toks` tokens are drawn.
  As lm-eval's HF model does, a prompt keeps its last `context_len - max_gen_toks` tokens.

Needs the `eval` extra (lm-eval). `python -m llmjax.evaluate` is the command line.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from llmjax.downstream import check_tokenizer
from llmjax.sample import Sampling, generate
from llmjax.scoring import Scorer, encode_pair


def _int(value, name: str, minimum: int = 1) -> int:
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a whole number, got {value!r}") from None
    if out < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {out}")
    return out


MODEL_ARGS = ("checkpoint", "checkpoint_path", "which", "dtype", "quantize", "batch_size", "device", "max_gen_toks", "seed")


def check_model_args(unknown: dict, *, model, checkpoint, checkpoint_path, which, dtype, quantize) -> None:
    """Refuse, in one line, a model argument that would be ignored: a name the model does not take
    (a typo such as `whcih=best` scored the latest checkpoint, `dtpye=bfloat16` float32), checkpoint
    options beside an in-memory `model`, or two different checkpoints."""
    if unknown:
        import difflib

        name = sorted(unknown)[0]
        near = difflib.get_close_matches(name, MODEL_ARGS, n=1)
        raise ValueError(f"unknown llmjax model argument '{name}'" + (f" (did you mean '{near[0]}'?)" if near else "")
                         + f"; it takes {', '.join(MODEL_ARGS)}")
    if model is not None:
        given = [k for k, v in (("checkpoint", checkpoint), ("checkpoint_path", checkpoint_path), ("dtype", dtype), ("quantize", quantize))
                 if v not in (None, "")] + (["which"] if which != "latest" else [])
        if given:
            raise ValueError(f"{', '.join(given)} {'apply' if len(given) > 1 else 'applies'} to a checkpoint; an in-memory model is scored as it is "
                             "(build or load it in the dtype you want, or pass checkpoint= instead of model=)")
    elif checkpoint and checkpoint_path and str(checkpoint) != str(checkpoint_path):
        raise ValueError(f"checkpoint={checkpoint} and checkpoint_path={checkpoint_path} name two runs; give one")


# Hugging Face `generate`'s top_k where neither the call nor the model's generation_config.json sets
# one (transformers' GenerationConfig default), which lm-eval's HF model samples with
HF_DEFAULT_TOP_K = 50


def task_sampling(gen_kwargs: dict) -> Sampling:
    """The sampler's settings for a generate_until request's (normalised) arguments, as lm-eval's HF
    model's `generate` call reads them: greedy unless do_sample and a temperature > 0; then that
    temperature, top_p (default 1), and top_k, default 50 where the task gives none (Hugging Face's
    default; 0: every token). A top_p out of (0, 1] or a negative top_k is refused by Sampling."""
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    if not (gen_kwargs.get("do_sample") and temperature > 0):
        return Sampling(greedy=True)
    top_k, top_p = gen_kwargs.get("top_k"), gen_kwargs.get("top_p")
    return Sampling(temperature=temperature, top_k=HF_DEFAULT_TOP_K if top_k is None else int(top_k) or None,
                    top_p=1.0 if top_p is None else float(top_p))


@register_model("llmjax")
class LlmjaxLM(TemplateLM):
    """An llmjax model for lm-eval: a checkpoint (`checkpoint`/`checkpoint_path`: a training run
    directory or one of its checkpoints/<step>; `which`: latest or best; `dtype`; `device`, e.g.
    cuda:0 or cpu), or an in-memory `model` and `tokenizer`."""

    def __init__(
        self, checkpoint: str | None = None, checkpoint_path: str | None = None, which: str = "latest", dtype: str | None = None,
        batch_size: int | str = 8, device: str | None = None, max_gen_toks: int | str = 256, seed: int | str = 1234,
        quantize: str | None = None,
        model=None, tokenizer=None, max_batch_size=None, trust_remote_code=None, **unknown,
    ):
        # (max_batch_size: lm-eval's simple_evaluate passes it, for its "auto" batch size; trust_remote_code:
        # its --trust_remote_code adds it to model_args. Both mean nothing here.)
        super().__init__()
        from llmjax.evaluate import load_for_scoring, pick_device  # (evaluate imports this module lazily)

        check_model_args(unknown, model=model, checkpoint=checkpoint, checkpoint_path=checkpoint_path, which=which, dtype=dtype,
                         quantize=quantize)

        if str(batch_size).startswith("auto"):  # lm-eval's "auto" probes memory with torch; a fixed size here
            batch_size = 8
        self.batch_size_per_gpu = _int(batch_size, "batch_size")
        self.max_gen_toks = _int(max_gen_toks, "max_gen_toks")
        self.seed = _int(seed, "seed", minimum=0)  # (numpy's SeedSequence, which generate_until seeds from, takes no negative seed)
        self.jax_device = pick_device(device)
        self.step = None
        if model is None:
            path = checkpoint or checkpoint_path
            if not path:
                raise ValueError("the llmjax model needs checkpoint=runs/NAME (a training run directory)")
            loaded = load_for_scoring(path, which, dtype=dtype, device=self.jax_device, quantize=quantize)
            model, tokenizer, self.step = loaded.model, loaded.tokenizer, loaded.step
        check_tokenizer(tokenizer, None)
        self.model, self.llmjax_tokenizer = model, tokenizer
        self.scorer = Scorer.for_model(model, self.batch_size_per_gpu)

    # --- what TemplateLM needs --------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.llmjax_tokenizer.eot_id

    @property
    def max_length(self) -> int:
        return self.model.cfg.context_len

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.llmjax_tokenizer.encode_prompt(string)  # ("<|endoftext|>": the token, as HF's tokenizer gives it)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.llmjax_tokenizer.decode(tokens)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """TemplateLM's, with the tokens of llmjax.scoring.encode_pair (lm-eval's rules, as the fast
        scorer's): an empty context and an empty continuation, lm-eval's IndexError, score 0 (log 1)."""
        reqs = [((ctx, cont), *encode_pair(self.llmjax_tokenizer, ctx, cont)) for ctx, cont in (req.args for req in requests)]
        return self._loglikelihood_tokens(reqs, disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        out = self.scorer.score([(ctx, cont) for _, ctx, cont in requests], progress=not disable_tqdm)
        for (key, _, _), result in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [req.args[0] for req in requests]
        out = self.scorer.rolling([self.tok_encode(t) for t in texts], self.eot_token_id, progress=not disable_tqdm)
        for text, ll in zip(texts, out):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), ll)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, when a request asks) continuations, batched per distinct set of
        generation arguments, each cut before its first stop string."""
        eos = self.tok_decode([self.eot_token_id])
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str | None] = [None] * len(requests)
        for g, idx in enumerate(groups.values()):
            kwargs = normalize_gen_kwargs(dict(requests[idx[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = int(kwargs.pop("max_gen_toks"))
            sampling = task_sampling(kwargs)
            keep = max(self.max_length - max_gen, 1)
            if max_gen >= self.max_length:  # (lm-eval's HF model refuses this; here the prompts keep one token)
                warnings.warn(f"max_gen_toks={max_gen} fills the model's whole context of {self.max_length}: each prompt keeps only "
                              "its last token; lower the task's max_gen_toks", stacklevel=2)
            idx = sorted(idx, key=lambda i: -len(requests[i].args[0]))
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s : s + self.batch_size]
                prompts = []
                for i in chunk:
                    ids = self.tok_encode(requests[i].args[0]) or [self.eot_token_id]
                    prompts.append(ids[-keep:])
                seed = int(np.random.SeedSequence([self.seed, g, s]).generate_state(1)[0])  # (one per group and batch, never shared)
                new = generate(self.model, prompts, max_gen, sampling=sampling, seed=seed, eot_id=self.eot_token_id)
                for i, ids in zip(chunk, new):
                    text = postprocess_generated_text(self.tok_decode(ids), until, None)
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out  # type: ignore[return-value]
