"""A Qwen-VL model: the vision tower's features replace the `<|image_pad|>` embeddings, then the decoder runs.

Qwen3-VL's DeepStack also adds the merged features of K early vision blocks to the hidden states at the image
tokens after decoder layers 0..K-1, in every pass over a prompt (prefill, scoring, training); its image features
are then a pair (features [B, M, D], DeepStack features [B, K, M, D]). Generated tokens are never image tokens,
so decoding needs none.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from vrft_jax.models.qwen2_vl.config import Qwen2VLConfig
from vrft_jax.models.qwen2_vl.inputs import ModelInputs
from vrft_jax.models.qwen2_vl.lora import LoRAConfig
from vrft_jax.models.qwen2_vl.text import KVCache, SharedPrefix, TextDecoder
from vrft_jax.models.qwen2_vl.vision import VisionTower


class Qwen2VL(nnx.Module):
    def __init__(self, config: Qwen2VLConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.visual = VisionTower(config, rngs=rngs)
        self.text = TextDecoder(config, rngs=rngs)

    def image_features(self, inputs: ModelInputs):
        """[B, P / merge^2, D]: one feature per merged token of each row's patch bucket."""
        return self.visual(inputs.patches, inputs.patch_segment_ids, inputs.patch_positions)

    def embed(self, input_ids_bt, image_features):
        """Token embeddings with the k-th `<|image_pad|>` of each row replaced by its k-th image feature."""
        features_bmd = image_features[0] if isinstance(image_features, tuple) else image_features
        x = self.text.embed(input_ids_bt)
        is_image, index = self._image_slots(input_ids_bt, features_bmd.shape[1])
        features = jnp.take_along_axis(features_bmd, index[..., None], axis=1)
        return jnp.where(is_image[..., None], features.astype(x.dtype), x)

    def deepstack(self, input_ids_bt, image_features):
        """float[B, K, T, D]: the DeepStack features at each row's image tokens, zero elsewhere (what decoder layer
        k < K adds); None for a model without DeepStack."""
        if not isinstance(image_features, tuple):
            return None
        deepstack_bkmd = image_features[1]
        is_image, index = self._image_slots(input_ids_bt, deepstack_bkmd.shape[2])
        placed = jnp.take_along_axis(deepstack_bkmd, index[:, None, :, None], axis=2)
        return jnp.where(is_image[:, None, :, None], placed, 0).astype(self.config.dtype)

    def _image_slots(self, input_ids_bt, num_features: int):
        is_image = input_ids_bt == self.config.image_token_id
        return is_image, jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, num_features - 1)

    def hidden_states(self, inputs: ModelInputs, cache: KVCache | None = None, image_features=None):
        """(float[B, T, D] final-norm hidden states, updated cache or None); `image_features` given
        (`image_features(inputs)` computed before) skip the vision tower."""
        features = self.image_features(inputs) if image_features is None else image_features
        x = self.embed(inputs.input_ids, features)
        return self.text(x, inputs.positions, inputs.attention_mask, cache,
                         deepstack=self.deepstack(inputs.input_ids, features))

    def __call__(self, inputs: ModelInputs):
        """float[B, T, V] logits, as `Qwen2VLForConditionalGeneration(...).logits`."""
        hidden, _ = self.hidden_states(inputs)
        return self.text.logits(hidden)

    def prefill(self, inputs: ModelInputs, cache: KVCache, image_features):
        """Run left-padded prompts, with their `image_features(inputs)`, into `cache` from slot `cache.index`.

        Returns (float[B, V] logits at the last slot, which is each row's last prompt token, cache).
        """
        hidden, cache = self.hidden_states(inputs, cache, image_features)
        return self.text.logits(hidden[:, -1:])[:, 0], cache

    def decode(self, tokens_b, positions_b3, cache: KVCache, prefix: SharedPrefix | None = None):
        """One new token per row at slot `cache.index`, after the group's shared `prefix` if given;
        returns (float[B, V] logits, cache)."""
        x = self.text.embed(tokens_b[:, None])
        hidden, cache = self.text(x, positions_b3[:, None, :], jnp.ones_like(tokens_b)[:, None], cache, prefix)
        return self.text.logits(hidden)[:, 0], cache


def with_config(model: Qwen2VL, **changes) -> Qwen2VL:
    """The same weights under a changed runtime config (e.g. `param_dtype`, `dtype`, `remat`); parameters are
    cast to the new structure's dtypes (the base's `param_dtype`, the adapters' own). Otherwise the new model
    shares the original's buffers, so donating one model's state to a jitted function invalidates the other.
    The adapters' dtype and dropout may change too; adding, removing or reshaping them changes the parameters:
    `with_lora`, `without_lora`, `merge_lora`."""
    config = model.config.replace(**changes)
    old = model.config.lora
    if (config.lora is None) != (old is None) or (
            config.lora is not None and config.lora.replace(param_dtype=old.param_dtype, dropout=old.dropout) != old):
        raise ValueError("with_config cannot change the adapters: use with_lora, without_lora or merge_lora")
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Qwen2VL(config, rngs=nnx.Rngs(0))))
    state = jax.tree.map(lambda x, a: x.astype(a.dtype), nnx.state(model), abstract)
    return nnx.merge(graphdef, state)


def with_lora(model: Qwen2VL, lora: LoRAConfig, seed: int) -> Qwen2VL:
    """`model` (without adapters) with fresh adapters of shape `lora` on its language model: A drawn from `seed`,
    B zero, so its logits are the base model's bit for bit. The base parameters are `model`'s own buffers."""
    if model.config.lora is not None:
        raise ValueError("the model has adapters already (Qwen2VLConfig.lora is set)")
    config = model.config.replace(lora=lora)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Qwen2VL(config, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, nnx.merge_state(nnx.state(model), _adapter_state(config, seed)))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _adapter_state(config: Qwen2VLConfig, seed: int) -> nnx.State:
    # The whole model is built, but only its adapters are returned: XLA drops the rest of the program.
    return nnx.state(Qwen2VL(config, rngs=nnx.Rngs(seed)), nnx.LoRAParam)


def base_graphdef(config: Qwen2VLConfig):
    """The structure of `config`'s model without adapters: over a LoRA model's non-adapter parameters
    (`nnx.state(model, nnx.Not(nnx.LoRAParam))`) it is the base model, with the adapters disabled."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Qwen2VL(config.replace(lora=None), rngs=nnx.Rngs(0))))
    return graphdef


def without_lora(model: Qwen2VL) -> Qwen2VL:
    """The base model under `model`'s adapters, sharing its buffers (the adapters disabled, not merged)."""
    return nnx.merge(base_graphdef(model.config), nnx.state(model, nnx.Not(nnx.LoRAParam)))


def merge_lora(model: Qwen2VL, dtype=None) -> Qwen2VL:
    """The model without adapters whose kernels are W + scale * A B, computed in float32 and stored in `dtype`
    (default: the base's `param_dtype`); new buffers. A model without adapters is returned as it is."""
    if model.config.lora is None:
        return model
    config = model.config.replace(lora=None)
    if dtype is not None:
        config = config.replace(param_dtype=dtype)
    merged = jax.jit(merged_params, static_argnums=(1, 2))(nnx.state(model), model.config.lora, config.param_dtype)
    return nnx.merge(base_graphdef(config), merged)


def merged_params(params: nnx.State, lora: LoRAConfig, dtype) -> nnx.State:
    """A LoRA model's parameters as the base structure's: each targeted kernel W + scale * A B (summed in
    float32), every leaf a new buffer in `dtype`. Jit it: the float32 sums are then transient, one kernel at a
    time."""
    flat = dict(nnx.to_flat_state(params))
    merged = []
    for path, variable in flat.items():
        if isinstance(variable, nnx.LoRAParam):
            continue
        value = variable[...]
        owner = path[:-1] + (path[-1].replace("_kernel", "_lora"),)
        if owner + ("a",) in flat:
            value = value.astype(jnp.float32) + lora_delta(flat[owner + ("a",)][...], flat[owner + ("b",)][...],
                                                           lora.scale)
        merged.append((path, variable.replace(jnp.array(value, dtype=dtype, copy=True))))
    return nnx.from_flat_state(merged)


def lora_delta(a, b, scale: float):
    """float32 scale * A B of stacked adapters: A [L, *in, r], B [L, r, *out] -> [L, *in, *out]."""
    layers, rank = a.shape[0], a.shape[-1]
    product = jnp.matmul(a.astype(jnp.float32).reshape(layers, -1, rank),
                         b.astype(jnp.float32).reshape(layers, rank, -1), precision=jax.lax.Precision.HIGHEST)
    return scale * product.reshape(a.shape[:-1] + b.shape[2:])


def random_init(config: Qwen2VLConfig, seed: int) -> Qwen2VL:
    """A model with random weights from `seed`, made by one compiled program (`config` and `seed` its static
    arguments, so a second call in the process reuses it). Built eagerly, each parameter's sampling and scaling
    would be programs of their own: about a hundred, each traced, lowered and compiled (or looked up)."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Qwen2VL(config, rngs=nnx.Rngs(seed))))
    return nnx.merge(graphdef, _random_state(config, seed))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _random_state(config: Qwen2VLConfig, seed: int) -> nnx.State:
    return nnx.state(Qwen2VL(config, rngs=nnx.Rngs(seed)))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, inputs: ModelInputs):
    return nnx.merge(graphdef, state)(inputs)


def forward(model: Qwen2VL, inputs: ModelInputs):
    """Jitted logits; one compilation per (model structure, input shapes)."""
    graphdef, state = nnx.split(model)
    return _forward(graphdef, state, inputs)


def forward_hf(model: Qwen2VL, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
               *, patch_bucket: int | None = None, mm_token_type_ids=None):
    """Call the model exactly as HF's `Qwen2VLForConditionalGeneration` on processor outputs; returns logits."""
    inputs = ModelInputs.from_hf(model.config, input_ids, attention_mask, pixel_values, image_grid_thw,
                                 patch_bucket=patch_bucket, mm_token_type_ids=mm_token_type_ids)
    return forward(model, inputs)


def compile_count() -> int:
    """How many programs the jitted forward has compiled in this process."""
    return _forward._cache_size()
