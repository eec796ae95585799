"""A BERT encoder in Flax NNX that loads any Hugging Face BERT folder (config.json + safetensors).

RETRO's keys come from a frozen, pre-trained BERT (paper section 2.3); this module is only the
network and its weight loading. Tokenisation, batching and pooling live in `embed.py`.

The layout follows Hugging Face's `BertModel` exactly (post-LN: LayerNorm after each residual
add) so that the same checkpoint gives the same hidden states: word + position + token-type
embeddings -> LayerNorm -> N x [self-attention -> add & norm -> GELU FFW -> add & norm].
Weights are read with `safetensors.numpy` (no torch); names may carry a `bert.` prefix or not.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from retro_jax.errors import RetroError

_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # HF "gelu" is the exact erf form
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The fields of a Hugging Face BERT config.json that the forward pass needs."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str = "gelu"

    @classmethod
    def from_json(cls, path: str) -> BertConfig:
        try:
            with open(path) as f:
                raw = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise RetroError(f"BERT config {path}: cannot read ({e})") from e
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise RetroError(f"BERT config {path}: only absolute position embeddings are supported")
        try:
            config = cls(
                vocab_size=int(raw["vocab_size"]),
                hidden_size=int(raw["hidden_size"]),
                num_layers=int(raw["num_hidden_layers"]),
                num_heads=int(raw["num_attention_heads"]),
                intermediate_size=int(raw["intermediate_size"]),
                max_position_embeddings=int(raw["max_position_embeddings"]),
                type_vocab_size=int(raw.get("type_vocab_size", 2)),
                layer_norm_eps=float(raw.get("layer_norm_eps", 1e-12)),
                hidden_act=str(raw.get("hidden_act", "gelu")),
            )
        except KeyError as e:
            raise RetroError(f"BERT config {path}: missing field {e.args[0]!r}") from e
        if config.hidden_act not in _ACTIVATIONS:
            raise RetroError(f"BERT config {path}: unsupported hidden_act {config.hidden_act!r}")
        if config.hidden_size % config.num_heads:
            raise RetroError(f"BERT config {path}: hidden_size not divisible by heads")
        return config

    def flops_per_token(self, seq_len: int) -> float:
        """Multiply-add FLOPs (x2) of one token through the encoder at this sequence length."""
        d, f = self.hidden_size, self.intermediate_size
        dense = 4 * d * d + 2 * d * f  # q, k, v, out + the two FFW matrices
        attention = 2 * seq_len * d  # scores and the weighted sum of values
        return 2.0 * self.num_layers * (dense + attention)


class BertEmbeddings(nnx.Module):
    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        d = config.hidden_size
        self.word = nnx.Embed(config.vocab_size, d, rngs=rngs)
        self.position = nnx.Embed(config.max_position_embeddings, d, rngs=rngs)
        self.token_type = nnx.Embed(config.type_vocab_size, d, rngs=rngs)
        self.norm = nnx.LayerNorm(d, epsilon=config.layer_norm_eps, rngs=rngs)

    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        """[batch, length] ids -> [batch, length, hidden]."""
        positions = jnp.arange(input_ids.shape[1])[None, :]
        x = self.word(input_ids) + self.position(positions) + self.token_type(token_type_ids)
        return self.norm(x)


class BertLayer(nnx.Module):
    """Self-attention and FFW, each followed by residual add and LayerNorm (BERT is post-LN)."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        self.num_heads = config.num_heads
        self.activation = config.hidden_act
        self.query = nnx.Linear(d, d, rngs=rngs)
        self.key = nnx.Linear(d, d, rngs=rngs)
        self.value = nnx.Linear(d, d, rngs=rngs)
        self.attention_out = nnx.Linear(d, d, rngs=rngs)
        self.attention_norm = nnx.LayerNorm(d, epsilon=config.layer_norm_eps, rngs=rngs)
        self.ffw_in = nnx.Linear(d, f, rngs=rngs)
        self.ffw_out = nnx.Linear(f, d, rngs=rngs)
        self.ffw_norm = nnx.LayerNorm(d, epsilon=config.layer_norm_eps, rngs=rngs)

    def __call__(self, x: jax.Array, key_bias: jax.Array) -> jax.Array:
        """x [batch, length, hidden], key_bias float32 [batch, 1, 1, length] (0 or -large) ->
        same as x. Computes in x's dtype, the attention softmax in float32."""
        b, n, d = x.shape
        h = self.num_heads

        def heads(t):  # [batch, length, hidden] -> [batch, heads, length, head_dim]
            return t.reshape(b, n, h, d // h).transpose(0, 2, 1, 3)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        scores = jnp.einsum("bhqc,bhkc->bhqk", q, k).astype(jnp.float32) / np.sqrt(d // h)
        weights = jax.nn.softmax(scores + key_bias, axis=-1).astype(v.dtype)  # in float32
        attended = jnp.einsum("bhqk,bhkc->bhqc", weights, v).transpose(0, 2, 1, 3)
        x = self.attention_norm(x + self.attention_out(attended.reshape(b, n, d)))
        hidden = _ACTIVATIONS[self.activation](self.ffw_in(x))
        return self.ffw_norm(x + self.ffw_out(hidden))


class BertEncoder(nnx.Module):
    """BERT without its pooler: token ids -> last-layer hidden states."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = BertEmbeddings(config, rngs=rngs)
        self.layers = nnx.List([BertLayer(config, rngs=rngs) for _ in range(config.num_layers)])

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        token_type_ids: jax.Array | None = None,
    ) -> jax.Array:
        """input_ids, attention_mask (1 = token, 0 = padding) [batch, length] -> [batch, length,
        hidden]."""
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)
        # Padded keys get a large negative score; queries at padding still compute (and are
        # ignored by pooling), which keeps every row finite.
        neg = jnp.finfo(jnp.float32).min  # the softmax runs in float32 (see BertLayer)
        key_bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, neg)
        for layer in self.layers:
            x = layer(x, key_bias)
        return x


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Average of hidden [batch, length, hidden] over non-padding tokens -> float32 [batch,
    hidden] (summed in float32 whatever the compute dtype)."""
    hidden = hidden.astype(jnp.float32)
    mask = attention_mask.astype(hidden.dtype)[..., None]
    return (hidden * mask).sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1.0)


# ---------------------------------------------------------------------------------------------
# Loading Hugging Face weights


def _linear(weights: dict, prefix: str) -> dict:
    # PyTorch stores Linear weights as [out, in]; nnx.Linear's kernel is [in, out].
    return {"kernel": weights[prefix + ".weight"].T, "bias": weights[prefix + ".bias"]}


def _norm(weights: dict, prefix: str) -> dict:
    return {"scale": weights[prefix + ".weight"], "bias": weights[prefix + ".bias"]}


def _hf_to_nnx(weights: dict, config: BertConfig) -> dict:
    """Nested dict in BertEncoder's layout from Hugging Face BertModel tensor names."""
    e = "embeddings."
    tree: dict = {
        "embeddings": {
            "word": {"embedding": weights[e + "word_embeddings.weight"]},
            "position": {"embedding": weights[e + "position_embeddings.weight"]},
            "token_type": {"embedding": weights[e + "token_type_embeddings.weight"]},
            "norm": _norm(weights, e + "LayerNorm"),
        },
        "layers": {},
    }
    for i in range(config.num_layers):
        p = f"encoder.layer.{i}."
        tree["layers"][i] = {
            "query": _linear(weights, p + "attention.self.query"),
            "key": _linear(weights, p + "attention.self.key"),
            "value": _linear(weights, p + "attention.self.value"),
            "attention_out": _linear(weights, p + "attention.output.dense"),
            "attention_norm": _norm(weights, p + "attention.output.LayerNorm"),
            "ffw_in": _linear(weights, p + "intermediate.dense"),
            "ffw_out": _linear(weights, p + "output.dense"),
            "ffw_norm": _norm(weights, p + "output.LayerNorm"),
        }
    return tree


def _strip_prefix(weights: dict) -> dict:
    """Drop a leading `bert.` (BertForPreTraining & co.); old checkpoints say gamma/beta."""
    out = {}
    for name, value in weights.items():
        if name.startswith("bert."):
            name = name[len("bert.") :]
        name = name.replace("LayerNorm.gamma", "LayerNorm.weight")
        name = name.replace("LayerNorm.beta", "LayerNorm.bias")
        out[name] = value
    return out


def load_bert(folder: str, dtype=jnp.float32) -> BertEncoder:
    """The BertEncoder of a Hugging Face folder holding config.json and model.safetensors."""
    from safetensors.numpy import load_file

    config = BertConfig.from_json(os.path.join(folder, "config.json"))
    weights_path = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(weights_path):
        raise RetroError(f"BERT folder {folder}: no model.safetensors (only safetensors is read)")
    try:
        weights = _strip_prefix(load_file(weights_path))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise RetroError(f"BERT weights {weights_path}: cannot read ({e})") from e
    try:
        tree = _hf_to_nnx(weights, config)
    except KeyError as e:
        raise RetroError(f"BERT weights {weights_path}: missing tensor {e.args[0]!r}") from e

    # Build the module abstractly (no random init of a possibly large model), then fill it.
    model = nnx.eval_shape(lambda: BertEncoder(config, rngs=nnx.Rngs(0)))
    graphdef, abstract = nnx.split(model)
    flat_loaded = dict(nnx.traversals.flatten_mapping(tree))
    flat_state = dict(abstract.flat_state())
    if set(flat_state) != set(flat_loaded):
        missing = sorted(".".join(map(str, k)) for k in set(flat_state) - set(flat_loaded))
        raise RetroError(f"BERT weights {weights_path}: cannot map parameters {missing[:3]}")
    for path, variable in flat_state.items():
        value = np.asarray(flat_loaded[path])
        if value.shape != variable.value.shape:
            raise RetroError(
                f"BERT weights {weights_path}: {'.'.join(map(str, path))} has shape "
                f"{value.shape}, config.json implies {variable.value.shape}"
            )
        variable.value = jnp.asarray(value, dtype=dtype)
    state = nnx.State.from_flat_path(flat_state)
    return nnx.merge(graphdef, state)
