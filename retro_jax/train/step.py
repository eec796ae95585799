"""One optimizer step and one evaluation step, jitted over the mesh.

Optimizer (paper section 3 / its Wikitext103 runs): AdamW with betas (0.9, 0.95) and weight
decay 0.1 on matrices only (norm scales and biases are not decayed), global-norm clipping, a
linear warmup then a cosine decay to min_lr_ratio x the peak learning rate at the last step.
Parameters and optimizer state are float32; the model's `dtype` sets the compute dtype.

Loss: token cross-entropy averaged over the batch's scored tokens (loss_mask). With gradient
accumulation the global batch is split into `grad_accum` micro-batches whose summed losses and
gradients are divided by the whole batch's token count, so the update equals the unsplit one.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from retro_jax.errors import RetroError
from retro_jax.sharding import BATCH_AXES, batch_sharding, check_batch_divides
from retro_jax.train.state import ModelDef, TrainState

# Parameter names that are scales of normalisations or biases (CCA's sink logits are biases of
# one more key, [cca layers, heads]): never weight-decayed.
_NO_DECAY = ("norm", "bias", "scale", "sink")


def lr_schedule(train) -> optax.Schedule:
    """Linear warmup from `warmup_from` (the paper's 1e-7) over `warmup_steps`, then cosine to
    min_lr_ratio x peak at `steps`."""
    peak = float(train.learning_rate)
    warmup = int(train.warmup_steps)
    steps = max(int(train.steps), warmup + 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=float(getattr(train, "warmup_from", 0.0)),
        peak_value=peak,
        warmup_steps=warmup,
        decay_steps=steps,
        end_value=peak * float(train.min_lr_ratio),
    )


def decay_mask(params: dict) -> dict:
    """True for weight matrices; False for norm scales, biases and vectors."""

    def decays(path, x) -> bool:
        names = [str(getattr(k, "key", k)) for k in path]
        return x.ndim >= 2 and not any(word in n for n in names for word in _NO_DECAY)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(train) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = lr_schedule(train)
    tx = optax.chain(
        optax.clip_by_global_norm(float(train.grad_clip)),
        optax.adamw(
            schedule,
            b1=float(train.b1),
            b2=float(train.b2),
            weight_decay=float(train.weight_decay),
            mask=decay_mask,
        ),
    )
    return tx, schedule


def token_losses(model, batch: dict, retrieval: bool):
    """(sum of nll in nats over the scored tokens, their count) of a batch: tokens, targets,
    loss_mask [B, n] (+ neighbours, used when `retrieval`)."""
    neighbours = batch["neighbours"] if retrieval and "neighbours" in batch else None
    nll = model.token_nll(batch["tokens"], neighbours, batch["targets"])
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(mask)


def drop_retrieval(batch: dict, key: jax.Array, rate: float, pad_id: int) -> dict:
    """Retrieval dropout (beyond the paper; `train.retrieval_dropout`): each sequence of the
    batch loses all its neighbours with probability `rate`. Its CCA then attends to nothing and
    adds nothing, so the sequence is trained exactly as RETRO[OFF] scores it."""
    if rate <= 0.0 or "neighbours" not in batch:
        return batch
    neighbours = batch["neighbours"]
    off = jax.random.bernoulli(key, rate, (neighbours.shape[0],))
    off = off.reshape(-1, *([1] * (neighbours.ndim - 1)))
    return {
        **batch,
        "neighbours": jnp.where(off, jnp.asarray(pad_id, neighbours.dtype), neighbours),
    }


def distract_retrieval(batch: dict, key: jax.Array, rate: float) -> dict:
    """Retrieval distractors (beyond the paper; `train.retrieval_distractors`): each chunk of
    the batch gets, with probability `rate`, the neighbours of the same chunk position in the
    next sequence of the batch instead of its own: neighbours of other text, which RETRO must
    learn to leave unread (what it meets at low overlap, the leakage curve's alpha <= 1/8).
    Another sequence's neighbours were retrieved with its own chunk, so nothing of this
    sequence's future comes with them."""
    if rate <= 0.0 or "neighbours" not in batch or batch["neighbours"].shape[0] < 2:
        return batch
    neighbours = batch["neighbours"]
    swap = jax.random.bernoulli(key, rate, neighbours.shape[:2])
    swap = swap.reshape(*swap.shape, *([1] * (neighbours.ndim - 2)))
    other = jnp.roll(neighbours, -1, axis=0)
    return {**batch, "neighbours": jnp.where(swap, other, neighbours)}


def _micro_batches(batch: dict, accum: int) -> dict:
    """[B, ...] -> [accum, B/accum, ...]; micro-batch a takes rows a, a+accum, ... so each one
    is spread over every device that holds a slice of the batch (no data movement)."""

    def split(x):
        x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
        spec = PartitionSpec(None, BATCH_AXES, *([None] * (x.ndim - 2)))
        mesh = jax.sharding.get_abstract_mesh()
        return x if mesh.empty else jax.lax.with_sharding_constraint(x, spec)

    return jax.tree.map(split, batch)


def make_train_step(
    model_def: ModelDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    retrieval: bool,
    grad_accum: int = 1,
    retrieval_dropout: float = 0.0,
    retrieval_distractors: float = 0.0,
    pad_id: int = 0,
    state_shardings: TrainState | None = None,
    batch_shardings: dict | None = None,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The jitted step (state, batch) -> (new state, metrics); the old state is donated.
    `retrieval_dropout` > 0 switches retrieval off for that share of the sequences, drawn from
    the state's rng (so a resumed run draws the same ones); `retrieval_distractors` > 0 gives
    that share of the chunks another sequence's neighbours (drawn the same way, after the
    dropout's draw).

    metrics: loss (mean nll over scored tokens), grad_norm (before clipping), lr, tokens
    (scored), params_finite, finite (loss, gradient norm and new parameters all finite: False
    means stop without saving this state).
    """

    def loss_sums(params, frozen, batch):
        return token_losses(model_def.merge(params, frozen), batch, retrieval)

    grad_fn = jax.value_and_grad(loss_sums, has_aux=True)

    def step(state: TrainState, batch: dict):
        rng, drop_key = jax.random.split(jax.random.wrap_key_data(state.rng))
        if retrieval:  # unchanged at rate 0
            # Distractors first, so a dropped sequence stays without neighbours.
            batch = distract_retrieval(
                batch, jax.random.fold_in(drop_key, 1), retrieval_distractors
            )
            batch = drop_retrieval(batch, drop_key, retrieval_dropout, pad_id)
        if grad_accum == 1:
            (loss_sum, count), grads = grad_fn(state.params, state.frozen, batch)
        else:

            def accumulate(carry, micro):
                (loss_acc, count_acc), grads_acc = carry
                (loss_m, count_m), grads_m = grad_fn(state.params, state.frozen, micro)
                grads_acc = jax.tree.map(jnp.add, grads_acc, grads_m)
                return ((loss_acc + loss_m, count_acc + count_m), grads_acc), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            init = ((jnp.zeros(()), jnp.zeros(())), zeros)
            ((loss_sum, count), grads), _ = jax.lax.scan(
                accumulate, init, _micro_batches(batch, grad_accum)
            )
        denominator = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denominator, grads)
        loss = loss_sum / denominator
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.global_norm(grads)
        # A huge step can leave finite loss and gradients but overflow the parameters (and a
        # norm of the updates would itself overflow), so the new parameters are checked.
        params_finite = jnp.all(
            jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)])
        )
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & params_finite
        new_state = TrainState(
            state.step + 1, params, state.frozen, opt_state, jax.random.key_data(rng)
        )
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": schedule(state.step),
            "tokens": count,
            "finite": finite,
            "params_finite": params_finite,
        }
        return new_state, metrics

    if state_shardings is None:
        return jax.jit(step, donate_argnums=0)
    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, None),
        donate_argnums=0,
    )


def make_eval_step(
    model_def: ModelDef, *, retrieval: bool
) -> Callable[[dict, dict, dict], dict[str, jax.Array]]:
    """Jitted (params, frozen, batch) -> sums over the batch: nll (nats), tokens, bytes."""

    def evaluate(params, frozen, batch):
        nll, count = token_losses(model_def.merge(params, frozen), batch, retrieval)
        scored_bytes = jnp.sum(batch["target_bytes"].astype(jnp.float32) * batch["loss_mask"])
        return {"nll": nll, "tokens": count, "bytes": scored_bytes}

    return jax.jit(evaluate)


def eval_summary(sums: dict[str, float]) -> dict[str, float]:
    """Summed nll / tokens / bytes -> loss (nats per token) and bits per byte."""
    tokens, scored_bytes = max(sums["tokens"], 1.0), sums["bytes"]
    bpb = sums["nll"] / math.log(2) / scored_bytes if scored_bytes > 0 else float("nan")
    return {"loss": sums["nll"] / tokens, "bpb": bpb}


def batch_shardings(batch: dict, mesh: jax.sharding.Mesh) -> dict[str, NamedSharding]:
    """Every batch field split along its leading (batch) axis over data x fsdp."""
    return {name: batch_sharding(mesh, len(x.shape)) for name, x in batch.items()}


def check_batch_split(global_batch: int, grad_accum: int, mesh: jax.sharding.Mesh) -> None:
    """RetroError unless the global batch splits over micro-batches and the batch axes."""
    if grad_accum < 1 or global_batch % grad_accum:
        raise RetroError(
            f"train.batch_size={global_batch} must be a multiple of train.grad_accum={grad_accum}"
        )
    if grad_accum == 1:
        check_batch_divides(global_batch, mesh, "train.batch_size")
    else:
        name = f"train.batch_size / train.grad_accum ({global_batch} / {grad_accum})"
        check_batch_divides(global_batch // grad_accum, mesh, name)
