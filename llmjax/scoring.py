"""Log-likelihood scoring: how likely a model finds a continuation after a context.

The one engine behind the evaluator's lm-evaluation-harness model (llmjax.harness), the built-in
HellaSwag / ARC scorer (llmjax.downstream) and the trainer's in-loop task evaluation.

A request is a pair of token lists (context, continuation). Its score is the sum of
log p(continuation token | everything before it) and whether every continuation token is the
model's argmax ("greedy"). The rules are lm-evaluation-harness's (HFLM):

- a request longer than the model's context keeps its last `context_len + 1` tokens (the context is
  cut on the left); a continuation longer than the context is an error;
- log-probabilities are normalised over the model's whole (padded) vocabulary, as the training loss
  is, so `-score / n_tokens` of a text is exactly the trainer's loss on it; the greedy check only
  considers real tokens (the sampler never draws padded rows).
- a log-likelihood that is not finite (a float16 forward that overflowed) is an error, never a
  score: lm-eval's metrics (numpy's argmax) would count the first NaN choice as the answer.

Requests are sorted by length and scored in batches of a fixed number of rows, right-padded to a
length bucket (powers of two up to 128, then multiples of 128, capped at the context). Padding never
changes a score: it sits after the scored tokens of a causal model, and a padded row is masked out.
So a request's score does not depend on the batch size or its batch-mates beyond float rounding.
The output head and its log-softmax over the vocabulary run only where a batch scores: on K
positions per row (K the bucket of the batch's longest continuation), not on all T (`model_scores`).
(A mixture-of-experts model in `capacity` mode would let padding compete for expert slots; it is
scored dropless, as decoding does — see `scoring_config`.)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmjax.sample import split_for_jit

Pair = tuple[Sequence[int], Sequence[int]]  # (context tokens, continuation tokens)


class ScoreError(ValueError):
    """A scoring problem a user can fix (one line)."""


def scoring_config(mcfg):
    """The model config used to score: a mixture-of-experts in capacity mode runs dropless, so that
    padding and batch-mates can never take a token's expert slot (the parameters are the same)."""
    if getattr(mcfg, "moe_mode", None) == "capacity":
        return mcfg.replace(moe_mode="dropless")
    return mcfg


def continuation_scores(logits_BTV, targets_BT, mask_BT, vocab_size: int):
    """(sum of log p(target) over the masked positions, all masked targets are the argmax) per row."""
    logits = logits_BTV.astype(jnp.float32)
    logp_BT = jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(logits, axis=-1)
    mask = mask_BT.astype(bool)
    ll_B = jnp.sum(jnp.where(mask, logp_BT, 0.0), axis=-1)
    real = jnp.arange(logits.shape[-1]) < vocab_size
    best_BT = jnp.argmax(jnp.where(real, logits, -jnp.inf), axis=-1)
    greedy_B = jnp.all(~mask | (best_BT == targets_BT), axis=-1)
    return ll_B, greedy_B


def model_scores(model, tokens_BT, starts_B, targets_BK, mask_BK):
    """continuation_scores of the model's predictions at positions starts_B[b] + k (k < K) only:
    the output head, and the log-softmax over the vocabulary, run on those K positions of each row
    rather than on all T (a HellaSwag ending is ~20 tokens of a ~90-token request)."""
    K = targets_BK.shape[1]
    x_BTD = model.features(tokens_BT)[0]
    idx_BK = starts_B[:, None] + jnp.arange(K, dtype=starts_B.dtype)
    x_BKD = jnp.take_along_axis(x_BTD, idx_BK[..., None], axis=1)
    return continuation_scores(model.head(x_BKD), targets_BK, mask_BK, model.cfg.vocab_size)


@functools.partial(jax.jit, static_argnums=0)
def _score_model(graphdef, params, tokens_BT, starts_B, targets_BK, mask_BK):
    """A pure function of the model's graph definition (static) and parameters: a call flattens a
    plain pytree. (Through `nnx.jit` every call walked the module graph: tens of ms of host time per
    batch, which bounded HellaSwag on an H200 at 405 items/s.)"""
    return model_scores(nnx.merge(graphdef, params), tokens_BT, starts_B, targets_BK, mask_BK)


def length_bucket(n: int, context: int) -> int:
    """Padded length for n tokens: a power of two from 16 up to 128, then a multiple of 128; at most
    the context."""
    if n <= 128:
        b = max(16, 1 << (max(n, 1) - 1).bit_length())
    else:
        b = -(-n // 128) * 128
    return min(b, context)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of a (context, continuation) text request, by lm-evaluation-harness's rules for
    causal models: an empty context becomes end-of-text (unless the continuation starts with it);
    trailing whitespace of the context moves to the continuation; the continuation's tokens are
    those of context + continuation after the context's own tokens (so a word split across the
    boundary is tokenised as one text)."""
    encode = tokenizer.encode_prompt  # ("<|endoftext|>" in a request is the token, as HF's GPT-2 tokenizer reads it)
    if context.strip() == "":  # (lm-eval has no rule for a whitespace-only context: it becomes text to score)
        cont = encode(context + continuation)
        if cont and cont[0] == tokenizer.eot_id:
            return cont[:1], cont[1:]
        return [tokenizer.eot_id], cont
    stripped = context.rstrip()
    if len(stripped) < len(context):
        context, continuation = stripped, context[len(stripped) :] + continuation
    whole = encode(context + continuation)
    ctx = encode(context)
    return ctx, whole[len(ctx) :]


def rolling_windows(tokens: Sequence[int], prefix_token: int, context_len: int) -> list[tuple[list[int], list[int]]]:
    """lm-evaluation-harness's disjoint rolling windows (context_len=1): every token of `tokens`
    is predicted exactly once, the first from `prefix_token`, each later window with as much
    preceding text as fits in the context. Returns (context, continuation) pairs."""
    tokens, L = list(tokens), context_len
    if not tokens:
        return []
    first = min(L, len(tokens))
    out = [([prefix_token], tokens[:first])]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, L)
        end = done + n
        out.append((tokens[max(0, end - L - 1) : end - n], tokens[end - n : end]))
        done = end
    return out


@dataclasses.dataclass
class Scorer:
    """Scores requests in batches of `batch_size` rows with `batch_fn(tokens, starts, targets, mask)
    -> (ll, greedy)`, which is `model_scores` of a model: NumPy arrays in, the tokens (batch_size, T)
    int32, each row's first scored position (batch_size,) int32, the targets (batch_size, K) int32
    and mask (batch_size, K) float32 of positions starts .. starts + K - 1, with T and K length
    buckets of the batch's longest request and longest continuation; arrays of shape (batch_size,)
    out, possibly still on the device."""

    batch_fn: Callable
    context_len: int
    batch_size: int = 8

    @classmethod
    def for_model(cls, model, batch_size: int = 8) -> "Scorer":
        """A scorer that runs `model` (an llmjax model; its `cfg` gives the context) on the default
        device, with the parameters the model holds now (one that changes later needs a new scorer)."""
        if getattr(model.cfg, "moe_mode", None) == "capacity":
            raise ScoreError("score a capacity-mode MoE through scoring_config(cfg) (dropless); capacity depends on padding")
        graphdef, params = split_for_jit(model)

        def fn(*arrays):
            return _score_model(graphdef, params, *(jnp.asarray(a) for a in arrays))

        return cls(batch_fn=fn, context_len=model.cfg.context_len, batch_size=batch_size)

    def __post_init__(self):
        if self.batch_size < 1:
            raise ScoreError(f"batch size must be >= 1, got {self.batch_size}")

    def _rows(self, requests: Sequence[Pair]) -> list[tuple[list[int], int]]:
        """Each request's row (_row); a request that cannot be scored is named by its index."""
        rows = []
        for i, (context, continuation) in enumerate(requests):
            try:
                rows.append(self._row(context, continuation))
            except ScoreError as e:
                raise ScoreError(f"request {i + 1} of {len(requests)}: {e}") from None
        return rows

    def _row(self, context: Sequence[int], continuation: Sequence[int]) -> tuple[list[int], int]:
        """The tokens a request feeds (the model's input is all but the last) and how many of its
        last predictions count."""
        L = self.context_len
        if len(continuation) > L:
            raise ScoreError(f"a continuation of {len(continuation)} tokens does not fit the model's context of {L}: score "
                             "fewer items (--limit) or a model with a longer context")
        if not context and continuation:
            raise ScoreError("a request needs at least one context token (lm-eval gives end-of-text to empty contexts)")
        whole = list(context) + list(continuation)
        return whole[-(L + 1) :], len(continuation)

    def _chunks(self, rows) -> list[tuple[list[int], int, int]]:
        """The batches score() runs: (the indices of its rows, T, K), longest requests first."""
        order = sorted((i for i, (_, n) in enumerate(rows) if n), key=lambda i: -len(rows[i][0]))
        B, L = self.batch_size, self.context_len
        out = []
        for chunk in (order[s : s + B] for s in range(0, len(order), B)):
            T = length_bucket(max(len(rows[i][0]) for i in chunk) - 1, L)
            out.append((chunk, T, length_bucket(max(rows[i][1] for i in chunk), T)))
        return out

    def warm_up(self, requests: Sequence[Pair]) -> None:
        """Compile every batch shape that score(requests) runs (one batch each), so that timing
        score() measures no compilation."""
        rows = self._rows(requests)
        shapes = {(T, K): (max(len(rows[i][0]) for i in chunk), max(rows[i][1] for i in chunk)) for chunk, T, K in self._chunks(rows)}
        for length, n in shapes.values():  # (a request as long as the batch's longest, with its longest continuation)
            self.score([([0] * (length - n), [0] * n)])

    def score(self, requests: Sequence[Pair], progress: bool = False) -> list[tuple[float, bool]]:
        """(log-likelihood, greedy) of each (context, continuation) request, in order."""
        rows = self._rows(requests)
        results: list[tuple[float, bool] | None] = [(0.0, True) if n == 0 else None for _, n in rows]
        chunks = self._chunks(rows)
        B = self.batch_size
        bar = None
        if progress and chunks:
            from tqdm import tqdm

            bar = tqdm(total=sum(len(chunk) for chunk, _, _ in chunks), unit="req", dynamic_ncols=True)
        try:  # (the bar ends its line also when a batch fails: an error after it starts a line of its own)
            pending = []  # dispatched batches: the host builds the next while the device runs this one
            for chunk, T, K in chunks:
                toks = np.zeros((B, T), np.int32)
                starts = np.zeros(B, np.int32)
                tgts = np.zeros((B, K), np.int32)
                mask = np.zeros((B, K), np.float32)
                for r, i in enumerate(chunk):
                    whole, n = rows[i]
                    m = len(whole) - 1  # the row's inputs; its last n predictions (positions m - n .. m - 1) are scored
                    toks[r, :m] = whole[:-1]
                    starts[r] = s = max(m - K, 0)  # (the K positions from s hold them: n <= K <= T)
                    w = min(K, m - s)
                    tgts[r, :w] = whole[s + 1 : s + 1 + w]
                    mask[r, m - n - s : m - s] = 1.0
                pending.append((chunk, self.batch_fn(toks, starts, tgts, mask)))
                if len(pending) > 2:
                    self._collect(pending.pop(0), results, bar)
            for item in pending:
                self._collect(item, results, bar)
        finally:
            if bar is not None:
                bar.close()
        bad = [i for i, (ll, _) in enumerate(results) if not math.isfinite(ll)]  # type: ignore[misc]
        if bad:  # (numpy's argmax over NaNs picks the first NaN: a metric would count them as answers)
            raise ScoreError(
                f"{len(bad)} of {len(results)} requests scored a log-likelihood of {results[bad[0]][0]} (the first: request "
                f"{bad[0] + 1}); the model's forward overflowed (float16 holds at most 65504: score with --dtype bfloat16 or "
                "float32) or its parameters are not finite")
        return results  # type: ignore[return-value]

    @staticmethod
    def _collect(item, results, bar):
        chunk, out = item
        ll, greedy = jax.device_get(out)
        for r, i in enumerate(chunk):
            results[i] = (float(ll[r]), bool(greedy[r]))
        if bar is not None:
            bar.update(len(chunk))

    def rolling(self, texts_tokens: Sequence[Sequence[int]], prefix_token: int, progress: bool = False) -> list[float]:
        """Log-likelihood of each whole token sequence (every token predicted once; the first from
        `prefix_token`), through lm-eval's rolling windows."""
        if not isinstance(prefix_token, (int, np.integer)):
            raise ScoreError(f"rolling log-likelihoods need a prefix token (the end-of-text id), got {prefix_token!r}: a character "
                             "vocabulary has none; pass the id of a token that starts texts, e.g. tokenizer.encode('\\n')[0]")
        windows, owner = [], []
        for j, toks in enumerate(texts_tokens):
            for pair in rolling_windows(toks, prefix_token, self.context_len):
                windows.append(pair)
                owner.append(j)
        totals = [0.0] * len(texts_tokens)
        for j, (ll, _) in zip(owner, self.score(windows, progress=progress)):
            totals[j] += ll
        return totals
