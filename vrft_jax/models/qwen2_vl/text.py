"""The text decoder (Qwen2's with q/k/v bias, or Qwen3's with q/k norms): RMSNorm, GQA, SwiGLU, M-RoPE, scanned layers,
KV cache, and Qwen3-VL's DeepStack additions."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from vrft_jax.models.qwen2_vl import rope
from vrft_jax.models.qwen2_vl.config import Qwen2VLConfig
from vrft_jax.models.qwen2_vl.layers import RMSNorm, attention, einsum, param, prefix_attention, scan_layers, stacked
from vrft_jax.models.qwen2_vl.lora import adapter, layer_scope
from vrft_jax.sharding import constrain


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for `S` slots; all rows write the same slot at each step.

    k, v: [L, B, S, K, H]; valid: bool[B, S], True where a slot holds a real (non-padding) token;
    index: int32[], the next slot to write.
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    index: jax.Array

    @classmethod
    def zeros(cls, config: Qwen2VLConfig, batch: int, length: int, dtype=None) -> KVCache:
        t = config.text
        shape = (t.num_layers, batch, length, t.num_kv_heads, t.head_dim)
        dtype = dtype or config.dtype
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   valid=jnp.zeros((batch, length), bool), index=jnp.zeros((), jnp.int32))

    @property
    def length(self) -> int:
        return self.k.shape[2]


@flax.struct.dataclass
class SharedPrefix:
    """A read-only cache of P prompts shared by the G consecutive rows of each group (B = P * G).

    Decoding G samples per prompt reads each prompt's keys once per step instead of G times, and
    stores them once: the prompt dominates the cache of an image prompt.
    k, v: [L, P, S, K, H]; valid: bool[P, S].
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array

    @classmethod
    def of(cls, cache: KVCache) -> SharedPrefix:
        return cls(k=cache.k, v=cache.v, valid=cache.valid)


class Attention(nnx.Module):
    def __init__(self, config: Qwen2VLConfig, *, rngs: nnx.Rngs):
        t = config.text
        self.config = config
        self.q_kernel = param(rngs, (t.hidden_size, t.num_heads, t.head_dim), ("embed", "heads", "head_dim"), config)
        self.k_kernel = param(rngs, (t.hidden_size, t.num_kv_heads, t.head_dim), ("embed", "kv_heads", "head_dim"),
                              config)
        self.v_kernel = param(rngs, (t.hidden_size, t.num_kv_heads, t.head_dim), ("embed", "kv_heads", "head_dim"),
                              config)
        if t.qkv_bias:
            self.q_bias = param(rngs, (t.num_heads, t.head_dim), ("heads", "head_dim"), config)
            self.k_bias = param(rngs, (t.num_kv_heads, t.head_dim), ("kv_heads", "head_dim"), config)
            self.v_bias = param(rngs, (t.num_kv_heads, t.head_dim), ("kv_heads", "head_dim"), config)
        if t.qk_norm:  # Qwen3: each head's q and k normalised over head_dim, before the rotation
            self.q_norm = RMSNorm(t.head_dim, t.rms_norm_eps, config, rngs=rngs, axis="head_dim")
            self.k_norm = RMSNorm(t.head_dim, t.rms_norm_eps, config, rngs=rngs, axis="head_dim")
        self.o_kernel = param(rngs, (t.num_heads, t.head_dim, t.hidden_size), ("heads", "head_dim", "embed"), config)
        embed = ((t.hidden_size,), ("embed",))
        self.q_lora = adapter("q_proj", *embed, (t.num_heads, t.head_dim), ("heads", "head_dim"), config, rngs=rngs)
        self.k_lora = adapter("k_proj", *embed, (t.num_kv_heads, t.head_dim), ("kv_heads", "head_dim"), config,
                              rngs=rngs)
        self.v_lora = adapter("v_proj", *embed, (t.num_kv_heads, t.head_dim), ("kv_heads", "head_dim"), config,
                              rngs=rngs)
        self.o_lora = adapter("o_proj", (t.num_heads, t.head_dim), ("heads", "head_dim"), *embed, config, rngs=rngs)

    def __call__(self, x_btd, cos_bth, sin_bth, mask_bts, cache=None, prefix=None):
        """Self-attention. With `cache = (k_all, v_all, layer, index)` (the stacked caches of every
        layer) the new keys/values are written in place at [layer, :, index] and the queries attend
        over this layer's whole cache; without one, over this sequence's own keys. In both cases also
        over `prefix = (k_pskh, v_pskh, valid_ps)` (this layer's shared prompt keys) when given.
        Returns (out_btd, (k_all, v_all) with a cache, else this sequence's (k_btkh, v_btkh))."""
        dtype, t = self.config.dtype, self.config.text
        q = einsum("BTD,DNH->BTNH", x_btd, self.q_kernel, self.config, self.q_lora)
        k = einsum("BTD,DKH->BTKH", x_btd, self.k_kernel, self.config, self.k_lora)
        v = einsum("BTD,DKH->BTKH", x_btd, self.v_kernel, self.config, self.v_lora)
        if t.qkv_bias:
            q, k, v = (y + b[...].astype(dtype) for y, b in ((q, self.q_bias), (k, self.k_bias), (v, self.v_bias)))
        if t.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = rope.apply_rope(q, cos_bth, sin_bth)
        k = rope.apply_rope(k, cos_bth, sin_bth)
        if cache is not None:
            k_all, v_all, layer, index = cache
            start = (layer, 0, index, 0, 0)
            k_all = jax.lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype), start)
            v_all = jax.lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype), start)
            k = jax.lax.dynamic_index_in_dim(k_all, layer, axis=0, keepdims=False)
            v = jax.lax.dynamic_index_in_dim(v_all, layer, axis=0, keepdims=False)
            cache = (k_all, v_all)
        else:
            cache = (k, v)
        if prefix is None:
            out = attention(q, k.astype(dtype), v.astype(dtype), mask_bts, self.config)
        else:
            k_pre, v_pre, valid_pre = prefix
            out = prefix_attention(q, k.astype(dtype), v.astype(dtype), mask_bts, k_pre.astype(dtype),
                                   v_pre.astype(dtype), valid_pre, self.config)
        return einsum("BTNH,NHD->BTD", out, self.o_kernel, self.config, self.o_lora), cache


class MLP(nnx.Module):
    def __init__(self, config: Qwen2VLConfig, *, rngs: nnx.Rngs):
        t = config.text
        self.config = config
        self.gate_kernel = param(rngs, (t.hidden_size, t.intermediate_size), ("embed", "mlp"), config)
        self.up_kernel = param(rngs, (t.hidden_size, t.intermediate_size), ("embed", "mlp"), config)
        self.down_kernel = param(rngs, (t.intermediate_size, t.hidden_size), ("mlp", "embed"), config)
        embed, mlp = ((t.hidden_size,), ("embed",)), ((t.intermediate_size,), ("mlp",))
        self.gate_lora = adapter("gate_proj", *embed, *mlp, config, rngs=rngs)
        self.up_lora = adapter("up_proj", *embed, *mlp, config, rngs=rngs)
        self.down_lora = adapter("down_proj", *mlp, *embed, config, rngs=rngs)

    def __call__(self, x_btd):
        gate = einsum("BTD,DF->BTF", x_btd, self.gate_kernel, self.config, self.gate_lora)
        up = einsum("BTD,DF->BTF", x_btd, self.up_kernel, self.config, self.up_lora)
        return einsum("BTF,FD->BTD", jax.nn.silu(gate) * up, self.down_kernel, self.config, self.down_lora)


class DecoderLayer(nnx.Module):
    def __init__(self, config: Qwen2VLConfig, *, rngs: nnx.Rngs):
        t = config.text
        self.input_norm = RMSNorm(t.hidden_size, t.rms_norm_eps, config, rngs=rngs, axis="embed")
        self.attn = Attention(config, rngs=rngs)
        self.post_attention_norm = RMSNorm(t.hidden_size, t.rms_norm_eps, config, rngs=rngs, axis="embed")
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x_btd, cos_bth, sin_bth, mask_bts, cache=None, prefix=None):
        x_btd = constrain(x_btd, ("batch", "length", "act_embed"))
        attn_out, cache = self.attn(self.input_norm(x_btd), cos_bth, sin_bth, mask_bts, cache, prefix)
        x_btd = x_btd + attn_out
        return x_btd + self.mlp(self.post_attention_norm(x_btd)), cache


class TextDecoder(nnx.Module):
    def __init__(self, config: Qwen2VLConfig, *, rngs: nnx.Rngs):
        t = config.text
        self.config = config
        self.embed_tokens = param(rngs, (t.vocab_size, t.hidden_size), ("vocab", "embed"), config)
        self.layers = stacked(lambda r: DecoderLayer(config, rngs=r), t.num_layers, rngs)
        self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps, config, rngs=rngs, axis="embed")
        self.lm_head = (None if config.tie_word_embeddings else
                        param(rngs, (t.hidden_size, t.vocab_size), ("embed", "vocab"), config))

    def embed(self, input_ids_bt):
        return jnp.take(self.embed_tokens[...], input_ids_bt, axis=0).astype(self.config.dtype)

    def __call__(self, x_btd, positions_bt3, attention_mask_bt, cache: KVCache | None = None,
                 prefix: SharedPrefix | None = None, keep_kv: bool = False, deepstack=None):
        """Decoder stack and final norm.

        Without a cache the mask is causal over this sequence's valid tokens. With a cache the tokens
        fill slots [cache.index, cache.index + T) and attend to every earlier valid slot. Either way
        they also attend to every valid slot of their group's `prefix` when one is given (it precedes
        them). Returns (hidden float[B, T, D], the updated cache; or without a cache, with `keep_kv`,
        this sequence's keys and values as a SharedPrefix [L, B, T, K, H], else None).

        Two ways to keep keys and values, for two uses. The cache rides in the layer scan's carry and
        is written in place: what decoding needs, one slot per step into a buffer it reuses. Without a
        cache each layer emits its keys and values as a scan output instead: what a differentiated
        pass needs, since under the gradient a scan saves its carry at every layer, and a carried
        [L, ...] cache would be saved L times (memory quadratic in depth); outputs are saved once.

        `deepstack` (Qwen3-VL, `Qwen2VL.deepstack`): float[B, K, T, D] added to the hidden states after layer
        k < K; read by the scan, not carried, so it is held once.
        """
        t = self.config.text
        cos, sin = rope.mrope_cos_sin(positions_bt3, t.head_dim, t.rope_theta, t.mrope_section, t.mrope_interleaved)
        cos, sin = cos.astype(self.config.dtype), sin.astype(self.config.dtype)
        length = x_btd.shape[1]
        valid = attention_mask_bt.astype(bool)
        if cache is None:
            q_slot = k_slot = jnp.arange(length)
            keys_valid = valid
        else:
            q_slot = cache.index + jnp.arange(length)
            k_slot = jnp.arange(cache.length)
            keys_valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, valid, cache.index, axis=1)
        mask = (k_slot[None, None, :] <= q_slot[None, :, None]) & keys_valid[:, None, :]

        layers = jnp.arange(t.num_layers)

        def add_deepstack(x, i):
            if deepstack is None:
                return x
            k = deepstack.shape[1]
            injected = jax.lax.dynamic_index_in_dim(deepstack, jnp.minimum(i, k - 1), axis=1, keepdims=False)
            return x + jnp.where(i < k, injected, jnp.zeros_like(injected)).astype(x.dtype)

        if cache is None:
            def body(layer, x, xs):
                i, k_pre, v_pre = xs
                layer_prefix = None if prefix is None else (k_pre, v_pre, prefix.valid)
                with layer_scope(i):  # the adapters' dropout masks, this layer's own (training's forward only)
                    x, kv = layer(x, cos, sin, mask, None, layer_prefix)
                return add_deepstack(x, i), kv if keep_kv else None

            xs = (layers, None, None) if prefix is None else (layers, prefix.k, prefix.v)
            x_btd, kv = scan_layers(self.layers, x_btd, xs, body, self.config)
            if keep_kv:
                cache = SharedPrefix(k=kv[0], v=kv[1], valid=valid)
        else:
            # The stacked caches ride in the carry and are updated in place, layer by layer; the
            # shared prefix is read-only, so it is scanned over as input.
            def body(layer, carry, xs):
                x, k_all, v_all = carry
                i, k_pre, v_pre = xs
                layer_prefix = None if prefix is None else (k_pre, v_pre, prefix.valid)
                x, (k_all, v_all) = layer(x, cos, sin, mask, (k_all, v_all, i, cache.index), layer_prefix)
                return (add_deepstack(x, i), k_all, v_all), None

            xs = (layers, None, None) if prefix is None else (layers, prefix.k, prefix.v)
            (x_btd, k, v), _ = scan_layers(self.layers, (x_btd, cache.k, cache.v), xs, body, self.config)
            cache = KVCache(k=k, v=v, valid=keys_valid, index=cache.index + length)
        return self.norm(x_btd), cache

    def logits(self, hidden_btd):
        """float[B, T, V] in the compute dtype."""
        if self.lm_head is None:
            logits = einsum("BTD,VD->BTV", hidden_btd, self.embed_tokens, self.config)
        else:
            logits = einsum("BTD,DV->BTV", hidden_btd, self.lm_head, self.config)
        return constrain(logits, ("batch", "length", "act_vocab"))
