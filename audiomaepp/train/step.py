"""Pretraining's pure train / eval steps (jitted with shardings by the runner)."""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from audiomaepp import models
from audiomaepp.train.state import TrainState, new_state


def init_params(model: nn.Module, rng: jax.Array, input_shape: tuple[int, int]) -> Any:
  """The model's initial parameters, boxed with their logical-axis metadata."""
  params_rng, masking_rng = jax.random.split(rng)
  return model.init({"params": params_rng, "masking": masking_rng},
                    jnp.zeros((1, *input_shape), jnp.float32))["params"]


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
                       input_shape: tuple[int, int]) -> TrainState:
  """Initialises parameters (unboxed from their logical-axis metadata) and optimiser state."""
  return new_state(models.unbox(init_params(model, rng, input_shape)), tx)


def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array, *,
               model: nn.Module, tx: optax.GradientTransformation, schedule: optax.Schedule,
               grad_accum_steps: int = 1, noise: Optional[jax.Array] = None
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimiser step (or one accumulation micro-step) on `batch['spectrogram']`.

  Args:
    state: the train state.
    batch: 'spectrogram' (batch, time, mel) float32.
    rng: the run's base key; the masks of this step use fold_in(rng, state.step), so a resumed
      run draws exactly the masks the uninterrupted one would.
    model: the masked autoencoder (compute dtype from its config; its loss is float32).
    tx: the optimiser from `optim.create_optimizer`.
    schedule: its learning-rate schedule (for reporting).
    grad_accum_steps: micro-steps per optimiser update (the optimiser is wrapped in MultiSteps).
    noise: (batch, patches) masking noise to sort instead of drawing it from `rng`
      (`models.masking_ids_from_noise`); the trainer never passes it: it lets a parity check
      feed the original trainer and this step the same masks.

  Returns:
    The new state and scalar metrics: loss, grad_norm (of this micro-batch's gradients) and
    lr (of the update this step contributes to).
  """
  masking_rng = jax.random.fold_in(rng, state.step)
  ids_keep = ids_restore = None
  if noise is not None:
    ids_keep, ids_restore, _ = models.masking_ids_from_noise(noise, model.config.num_keep)

  def loss_fn(params):
    out = model.apply({"params": params}, batch["spectrogram"], ids_keep, ids_restore,
                      rngs={"masking": masking_rng})
    return out["loss"].astype(jnp.float32)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
             "lr": jnp.asarray(schedule(state.step // grad_accum_steps), jnp.float32)}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params: Any, batch: dict[str, jax.Array], rng: jax.Array, *,
              model: nn.Module) -> dict[str, jax.Array]:
  """Masked-patch loss of `batch` with masks from `rng`, plus the first example's reconstruction.

  Returns loss (), and for example 0: spectrogram (time, mel), reconstruction (time, mel) in
  input units (de-normalised when norm_pix_loss), pixel_mask (time, mel) with 1 on removed
  patches.
  """
  config = model.config
  out = model.apply({"params": params}, batch["spectrogram"], rngs={"masking": rng})
  pred = out["pred"][:1].astype(jnp.float32)
  if config.norm_pix_loss:
    patches = models.patchify(batch["spectrogram"][:1].astype(jnp.float32), config.patch_size)
    mean, scale = models.patch_statistics(patches)
    pred = pred * scale + mean
  pixel_mask = jnp.broadcast_to(out["mask"][:1, :, None], pred.shape)
  to_image = lambda p: models.unpatchify(p, config.patch_size, config.grid)[0]
  return {"loss": out["loss"].astype(jnp.float32),
          "spectrogram": batch["spectrogram"][0],
          "reconstruction": to_image(pred),
          "pixel_mask": to_image(pixel_mask)}

