"""Group rollouts: encode and prefill each prompt once, then decode G samples of it from a shared cache.

`rollout` is two compiled programs:
  prefill: the vision tower and the prompt's KV cache, once per prompt ([B, ...] shapes: the cost
           does not grow with G);
  decode:  a `lax.while_loop` that samples B*G rows until every row has hit an EOS id or
           `max_new_tokens`, with temperature, top-k, top-p or greedy selection; the G rows of a
           prompt share its cache (read once per step, never copied) and own only the cache of
           their generated tokens, updated in place.
Generated tokens continue M-RoPE from each prompt's rope delta exactly as HF `generate` does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vrft_jax import distributed, sharding
from vrft_jax.fields import known_fields
from vrft_jax.models.qwen2_vl.config import Qwen2VLConfig
from vrft_jax.models.qwen2_vl.inputs import ModelInputs
from vrft_jax.models.qwen2_vl.lora import LoRAConfig
from vrft_jax.models.qwen2_vl.model import Qwen2VL, merged_params
from vrft_jax.models.qwen2_vl.text import KVCache, SharedPrefix
from vrft_jax.padding import check_left_padded

LAYOUTS = ("whole", "sharded")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    max_new_tokens: int
    group_size: int = 1
    temperature: float = 1.0
    top_k: int | None = None  # None or 0: no top-k filter
    top_p: float = 1.0
    greedy: bool = False
    eos_token_ids: tuple[int, ...] = (151645, 151643)  # <|im_end|>, <|endoftext|>
    pad_token_id: int = 151643
    # Never sampled. None: the model's vision special tokens (<|vision_start|>, <|vision_end|>,
    # <|image_pad|>, <|video_pad|>); TRL 1.16 suppresses <|image_pad|> alone, Visual-RFT nothing (`()`).
    suppressed_token_ids: tuple[int, ...] | None = None
    # HF's rule (`repetition_penalty`): the logit of every token already in the row (its prompt's real
    # tokens and what it generated) is divided by it when positive, multiplied when negative, before
    # the temperature. 1.0 is off; Qwen2-VL's shipped generation config and Visual-RFT's evaluation use 1.05.
    repetition_penalty: float = 1.0
    # The sampler's copy of the weights on a mesh (`make_sampler_cast`): "whole" within each fsdp group (split
    # over tensor only: decoding reads local weights; `sharding.SAMPLING_RULES`) or "sharded" as the train
    # state (a fraction of the memory, an all-gather per layer per decoded token).
    layout: str = "whole"

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"SamplingConfig.layout={self.layout!r} is not one of {LAYOUTS}")
        if self.max_new_tokens < 1 or self.group_size < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} and group_size={self.group_size} must be >= 1")
        if not self.greedy and self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0 (use greedy=True for argmax)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty} must be > 0")
        object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))
        if self.suppressed_token_ids is not None:
            object.__setattr__(self, "suppressed_token_ids", tuple(self.suppressed_token_ids))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SamplingConfig:
        """From a plain mapping (a recipe's `sampling` block); unknown keys are errors."""
        return cls(**known_fields(cls, values))

    def resolve(self, model_config) -> SamplingConfig:
        """This config with the model's vision tokens filled in, checked against its vocabulary."""
        suppressed = self.suppressed_token_ids
        if suppressed is None:
            suppressed = (model_config.vision_start_token_id, model_config.vision_end_token_id,
                          model_config.image_token_id, model_config.video_token_id)
        vocab = model_config.text.vocab_size
        for name, ids in (("eos_token_ids", self.eos_token_ids), ("suppressed_token_ids", suppressed),
                          ("pad_token_id", (self.pad_token_id,))):
            outside = [i for i in ids if not 0 <= i < vocab]
            if outside:
                raise ValueError(f"SamplingConfig.{name} has ids {outside} outside the vocabulary of {vocab}")
        return dataclasses.replace(self, suppressed_token_ids=tuple(sorted(set(suppressed))))


@flax.struct.dataclass
class Rollout:
    """B*G completions, row b*G + g being sample g of prompt b.

    tokens:   int32[B*G, L], `pad_token_id` after a row's EOS (the EOS itself is kept)
    logprobs: float32[B*G, L], log softmax(logits / temperature) of each sampled token; 0 on padding
    lengths:  int32[B*G], tokens up to and including the first EOS (L when none)
    image_features: [B, P / merge^2, D] the prompts' vision features from prefill (`rollout(...,
              keep_image_features=True)`: with a frozen vision tower, scoring and the update embed them
              instead of running the tower again), else None
    """

    tokens: jax.Array
    logprobs: jax.Array
    lengths: jax.Array
    image_features: jax.Array | None = None

    @property
    def mask(self) -> jax.Array:
        """bool[B*G, L]: the real (non-padding) completion tokens."""
        return jnp.arange(self.tokens.shape[1])[None, :] < self.lengths[:, None]


@flax.struct.dataclass
class Prefilled:
    """The prompts' state after prefill: one row per prompt (the decoder repeats it for the G samples)."""

    logits: jax.Array  # float32[B, V] at each prompt's last token
    cache: KVCache  # [L, B, T, K, H]: the prompts' keys and values, shared by each group's samples
    next_positions: jax.Array  # int32[B]: M-RoPE position of the first generated token
    image_features: jax.Array  # [B, P / merge^2, D]: what the vision tower made of the prompts' images
    seen: jax.Array | None = None  # bool[B, V]: the prompt's real tokens, with a repetition penalty


def rollout(model: Qwen2VL, inputs: ModelInputs, key: jax.Array, config: SamplingConfig, *,
            keep_image_features: bool = False, mesh: jax.sharding.Mesh | None = None) -> Rollout:
    """Sample `config.group_size` completions of every left-padded prompt in `inputs`; with
    `keep_image_features`, the rollout also returns the prompts' vision features. On a `mesh` (the run's),
    both programs are traced under it and the sampler layout's rules (`traced_on`), as `aot` compiles them."""
    check_left_padded(inputs)
    config = config.resolve(model.config)
    graphdef, state = nnx.split(model)
    abstract = None if mesh is None else mesh.abstract_mesh
    prefilled = prefill(graphdef, state, inputs, config, abstract)
    out = decode(graphdef, state, prefilled, key, config, abstract)
    return out.replace(image_features=prefilled.image_features) if keep_image_features else out


@contextlib.contextmanager
def traced_on(mesh: jax.sharding.AbstractMesh | None, layout: str):
    """Inside `prefill` and `decode`: on a mesh, the model's `sharding.constrain` pins activations by the
    sampler layout's rules (`layout_rules`), exactly as `placement.jit_on_mesh` traces the train programs;
    without one, nothing (single-device code is unchanged). The mesh is a static argument of both programs,
    so a program traced on one mesh is never reused on another."""
    if mesh is None:
        yield
        return
    with jax.sharding.use_abstract_mesh(mesh), sharding.use_rules(layout_rules(layout)):
        yield


def make_sampler_cast(params: nnx.State, dtype, mesh=None, layout: str = "whole", lora: LoRAConfig | None = None
                      ) -> Callable[[nnx.State], nnx.State]:
    """A jitted `params -> the rollout's weights`: a fresh copy in `dtype`, on a mesh in the sampling `layout`
    (`SamplingConfig.layout`). The copy is explicit, so even when nothing changes (float32 on one device) its
    outputs are new buffers: a donated train step can never invalidate them, nor they it. With `lora` (the
    parameters' adapters) the copy is the merged model, each targeted kernel W + scale * A B summed in float32:
    the rollout runs the base structure (`sampler_graphdef` of the config without adapters) at no cost per token."""
    dtype = jnp.dtype(dtype)

    def cast(params):
        if lora is not None:
            return merged_params(params, lora, dtype)  # new buffers: every leaf is computed or cast
        return jax.tree.map(lambda x: jnp.array(x, dtype=dtype, copy=True), params)

    shardings = None
    if mesh is not None:
        shardings = sharding.state_shardings(jax.eval_shape(cast, params), mesh, layout_rules(layout))
    return jax.jit(cast, out_shardings=shardings)


def layout_rules(layout: str):
    """The logical-axis rules of a sampler layout (`SamplingConfig.layout`)."""
    return sharding.SAMPLING_RULES if layout == "whole" else sharding.DEFAULT_RULES


def sampler_graphdef(config: Qwen2VLConfig, dtype):
    """The model structure that computes in `dtype` over `dtype` parameters: the rollout's (a LoRA model's
    merged, without adapters: `make_sampler_cast`)."""
    config = config.replace(dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype), lora=None)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Qwen2VL(config, rngs=nnx.Rngs(0))))
    return graphdef


def local_completions(out: Rollout) -> tuple[np.ndarray, np.ndarray]:
    """This process's completion rows (tokens, bool mask) as NumPy, in the order of its batch meta: every row
    on one process; across processes the rows of its addressable shards (`distributed.local_rows`), which hold
    its own prompts' completions when the rollout's rows are pinned to the batch layout (`distributed.pin_rows`)."""
    tokens, lengths = distributed.local_rows(out.tokens), distributed.local_rows(out.lengths)
    return tokens, np.arange(tokens.shape[1])[None, :] < lengths[:, None]


def stopped_rows(tokens: np.ndarray, mask: np.ndarray, eos_token_ids) -> np.ndarray:
    """bool[rows] of `local_completions`' rows: those that ended on a stop id (the others ran to the token limit)."""
    lengths = mask.sum(axis=1)
    last = tokens[np.arange(len(tokens)), np.maximum(lengths - 1, 0)]
    return (lengths > 0) & np.isin(last, eos_token_ids)


def detokenize(tokenizer, tokens: np.ndarray, mask: np.ndarray) -> list[str]:
    """Each completion's text up to and including its EOS, special tokens dropped (as TRL decodes)."""
    pad = tokenizer.pad_token_id
    return tokenizer.batch_decode(np.where(mask, tokens, pad).tolist(), skip_special_tokens=True)


def reshard(model: Qwen2VL, mesh: jax.sharding.Mesh, rules=sharding.SAMPLING_RULES) -> Qwen2VL:
    """The same weights in the sampler's layout (by default whole within each fsdp group, split over
    tensor: decoding is bandwidth-bound and should not all-gather weights every token)."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.device_put(state, sharding.state_shardings(state, mesh, rules)))


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def prefill(graphdef, state, inputs: ModelInputs, config: SamplingConfig,
            mesh: jax.sharding.AbstractMesh | None = None) -> Prefilled:
    """Encode the images and fill the KV cache once per prompt: nothing here depends on G. On a `mesh`, every
    output is pinned split over the batch axes on its prompt axis: the layout `decode` is compiled for (and
    `aot` reads from this program's compiled output shardings)."""
    with traced_on(mesh, config.layout):
        return _pin_prompt_rows(_prefill(graphdef, state, inputs, config))


def _prefill(graphdef, state, inputs: ModelInputs, config: SamplingConfig) -> Prefilled:
    model = nnx.merge(graphdef, state)
    batch, length = inputs.input_ids.shape
    cache = KVCache.zeros(model.config, batch, length)
    features = model.image_features(inputs)
    logits, cache = model.prefill(inputs, cache, features)
    next_positions = jnp.sum(inputs.attention_mask, axis=1) + inputs.rope_deltas
    seen = None
    if config.repetition_penalty != 1.0:  # padding is not a token of the prompt (HF's batches count it)
        ids = jnp.where(inputs.attention_mask > 0, inputs.input_ids, logits.shape[-1])  # out of range: dropped
        seen = jnp.zeros(logits.shape, bool).at[jnp.arange(batch)[:, None], ids].set(True, mode="drop")
    return Prefilled(logits=logits.astype(jnp.float32), cache=cache, next_positions=next_positions.astype(jnp.int32),
                     image_features=features, seen=seen)


def _pin_prompt_rows(prefilled: Prefilled) -> Prefilled:
    """Every array of `prefilled` split over the batch axes on its prompt axis (axis 1 of the [layers, B, ...]
    keys and values, axis 0 elsewhere); a no-op without an ambient mesh."""
    def pin(x):
        if not x.ndim:
            return x
        names = [None] * x.ndim
        names[1 if x.ndim == 5 else 0] = "batch"
        return sharding.constrain(x, names)

    return jax.tree.map(pin, prefilled)


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def decode(graphdef, state, prefilled: Prefilled, key: jax.Array, config: SamplingConfig,
           mesh: jax.sharding.AbstractMesh | None = None) -> Rollout:
    """Sample G rows per prompt until every row is done (early exit) or `max_new_tokens`.

    The prompts' cache is shared, never repeated: each group's G rows attend to their prompt's keys
    (read once per step) and to their own generated keys, a [B*G, max_new_tokens] cache that is
    the loop's carry, updated in place.
    """
    with traced_on(mesh, config.layout):
        return _decode(graphdef, state, prefilled, key, config)


def _decode(graphdef, state, prefilled: Prefilled, key: jax.Array, config: SamplingConfig) -> Rollout:
    model = nnx.merge(graphdef, state)
    g = config.group_size
    repeat = functools.partial(jnp.repeat, repeats=g, axis=0)
    prefix = SharedPrefix.of(prefilled.cache)
    next_positions = repeat(prefilled.next_positions)
    cache = KVCache.zeros(model.config, next_positions.shape[0], config.max_new_tokens)
    rows = next_positions.shape[0]
    steps = config.max_new_tokens
    eos = jnp.asarray(config.eos_token_ids, jnp.int32)

    def cond(carry):
        step, _, _, _, _, done, _, _ = carry
        return (step < steps) & ~jnp.all(done)

    def body(carry):
        step, logits, cache, tokens, logprobs, done, lengths, seen = carry
        token, logprob = sample_token(logits, jax.random.fold_in(key, step), config, seen)
        token = jnp.where(done, config.pad_token_id, token)
        if seen is not None:
            seen = seen.at[jnp.arange(rows), token].set(True)
        tokens = tokens.at[:, step].set(token)
        logprobs = logprobs.at[:, step].set(jnp.where(done, 0.0, logprob))
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(token, eos)
        positions = jnp.broadcast_to((next_positions + step)[:, None], (rows, 3))
        logits, cache = model.decode(token, positions, cache, prefix)
        return step + 1, logits.astype(jnp.float32), cache, tokens, logprobs, done, lengths, seen

    carry = (jnp.int32(0), repeat(prefilled.logits), cache,
             jnp.full((rows, steps), config.pad_token_id, jnp.int32), jnp.zeros((rows, steps), jnp.float32),
             jnp.zeros((rows,), bool), jnp.zeros((rows,), jnp.int32),
             None if prefilled.seen is None else repeat(prefilled.seen))
    _, _, _, tokens, logprobs, _, lengths, _ = jax.lax.while_loop(cond, body, carry)
    return Rollout(tokens=tokens, logprobs=logprobs, lengths=lengths)


def repetition_penalty(logits_bv, seen_bv, penalty: float):
    """HF's `RepetitionPenaltyLogitsProcessor`: the logits of the `seen` tokens divided by `penalty` where
    positive, multiplied where negative; the others unchanged."""
    return jnp.where(seen_bv, jnp.where(logits_bv < 0, logits_bv * penalty, logits_bv / penalty), logits_bv)


def sample_token(logits_bv, key, config: SamplingConfig, seen_bv=None):
    """(int32[B] tokens, float32[B] their log-probability under softmax(logits / temperature)).

    Processing follows HF's order: the repetition penalty over `seen_bv` (when given), suppressed
    tokens, temperature, top-k, then top-p (over the renormalised top-k set). The returned
    log-probability is of the unprocessed logits over the full vocabulary: what the trainer
    recomputes from the policy's logits.
    """
    temperature = 1.0 if config.greedy else config.temperature
    logits_bv = logits_bv.astype(jnp.float32)
    full = logits_bv / temperature
    top = jax.lax.stop_gradient(jnp.max(full, axis=-1, keepdims=True))
    full_logprobs_norm = top[:, 0] + jnp.log(jnp.sum(jnp.exp(full - top), axis=-1))
    scaled = full
    if seen_bv is not None:
        scaled = repetition_penalty(logits_bv, seen_bv, config.repetition_penalty) / temperature
    if config.suppressed_token_ids:  # a select fused with the scaling, not a scatter into a copy
        suppressed = jnp.zeros(scaled.shape[-1], bool).at[jnp.asarray(config.suppressed_token_ids)].set(True)
        scaled = jnp.where(suppressed, -jnp.inf, scaled)
    if config.greedy:
        token = jnp.argmax(scaled, axis=-1).astype(jnp.int32)
    elif config.top_k:
        values, indices = top_k(scaled, config.top_k)  # sorted, descending
        values = _top_p_filter_sorted(values, config.top_p)
        choice = jax.random.categorical(key, values, axis=-1)
        token = jnp.take_along_axis(indices, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    elif config.top_p < 1.0:
        order = jnp.argsort(-scaled, axis=-1)
        values = _top_p_filter_sorted(jnp.take_along_axis(scaled, order, axis=-1), config.top_p)
        choice = jax.random.categorical(key, values, axis=-1)
        token = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    else:
        token = jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
    chosen = jnp.take_along_axis(logits_bv, token[:, None], axis=-1)[:, 0] / temperature
    return token, chosen - full_logprobs_norm


def top_k(x_bv, k: int, tile: int | None = None):
    """`jax.lax.top_k(x, k)` of each row, exactly (values and indices, ties to the lower index), by way of
    tile maxima: the rows' `tile`-wide tiles are ranked by their maximum, and the k best tiles hold the k
    largest values (a value outside them is beaten by k tile maxima, each a distinct larger value). One
    pass over the row and two small top-k's instead of a top-k over the whole vocabulary (on the CPU,
    the sampler's costliest operation after the LM head: 15 of its 62 ms per step at 64 rows x 151,657).
    `tile` defaults to a divisor of the width near 64 (187 for 151,657, 128 for the checkpoints' 151,936),
    so the tiles are a view of the row; without one, 64 and the last partial tile join the candidates."""
    rows, width = x_bv.shape
    tile = tile or min((t for t in range(32, 257) if width % t == 0), key=lambda t: abs(t - 64), default=64)
    tiles = width // tile
    if tiles <= k:
        return jax.lax.top_k(x_bv, k)
    body = x_bv[:, :tiles * tile].reshape(rows, tiles, tile)
    _, best = jax.lax.top_k(jnp.max(body, axis=-1), k)
    best = jnp.sort(best, axis=-1)  # candidates in vocabulary order: lax.top_k's ties then break as on the row
    candidates = jnp.take_along_axis(body, best[:, :, None], axis=1).reshape(rows, k * tile)
    ids = (best[:, :, None] * tile + jnp.arange(tile)).reshape(rows, k * tile)
    # The tail that does not fill a tile joins the candidates whole (it comes last: the highest ids).
    candidates = jnp.concatenate([candidates, x_bv[:, tiles * tile:]], axis=1)
    ids = jnp.concatenate([ids, jnp.broadcast_to(jnp.arange(tiles * tile, width), (rows, width - tiles * tile))],
                          axis=1)
    values, position = jax.lax.top_k(candidates, k)
    return values, jnp.take_along_axis(ids, position, axis=-1)


def _top_p_filter_sorted(values_desc, top_p: float):
    """Mask (to -inf) the tail of descending logits outside the nucleus: a token is kept when the
    probability of the tokens strictly more likely than it is below `top_p` (HF's rule); the most
    likely token is always kept."""
    if top_p >= 1.0:
        return values_desc
    probs = jax.nn.softmax(values_desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    keep = (before < top_p) | (jnp.arange(values_desc.shape[-1]) == 0)
    return jnp.where(keep, values_desc, -jnp.inf)


def greedy_generate(model: Qwen2VL, inputs: ModelInputs, max_new_tokens: int, *, eos_token_ids=None,
                    pad_token_id: int | None = None, suppressed_token_ids=(),
                    repetition_penalty: float = 1.0) -> np.ndarray:
    """int32[B, <= max_new_tokens] greedy continuations as HF `generate(do_sample=False)` returns them:
    `pad_token_id` after a row's EOS, trimmed where every row is done.

    The stop set and the pad id default to `SamplingConfig`'s, the ones training samples with:
    <|im_end|> and <|endoftext|>, as Qwen2-VL's generation config stops on (review M6; its
    `config.json` lists <|im_end|> alone, which `model.config.eos_token_ids` holds)."""
    given = dict(eos_token_ids=eos_token_ids, pad_token_id=pad_token_id)
    config = SamplingConfig(max_new_tokens=max_new_tokens, greedy=True, suppressed_token_ids=suppressed_token_ids,
                            repetition_penalty=repetition_penalty,
                            **{name: value for name, value in given.items() if value is not None})
    out = rollout(model, inputs, jax.random.key(0), config)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    return tokens[:, :int(lengths.max())]
