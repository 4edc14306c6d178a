"""What the jitted steps of the search and the retraining share.

DARTS' weight optimizer (SGD with momentum on a per-epoch learning-rate
schedule, the raw gradient clipped, then weight decay added, PyTorch's order),
cross-entropy with optional label smoothing, accuracy, and the guard that keeps
a non-finite step from changing the state.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from amended_darts_jax import hypergrad

SCHEDULES = ("cosine", "linear")


def epoch_schedule(lr: float, lr_min: float, epochs: int, steps_per_epoch: int,
                   shape: str = "cosine") -> Callable[[jax.Array], jax.Array]:
  """The learning rate at a step, constant within an epoch: a cosine from lr to
  lr_min over `epochs` (DARTS, CIFAR), or linear from lr to 0 (DARTS, ImageNet)."""
  if shape not in SCHEDULES:
    raise ValueError(f"the schedule must be one of {SCHEDULES}, got {shape!r}")

  def lr_fn(step):
    epoch = jnp.minimum(step // steps_per_epoch, epochs)
    if shape == "linear":
      return lr * (1.0 - epoch / epochs)
    cos = 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / epochs))
    return lr_min + (lr - lr_min) * cos

  return lr_fn


def sgd(lr_fn: Callable[[jax.Array], jax.Array], *, grad_clip: float, weight_decay: float,
        momentum: float, nesterov: bool = False) -> optax.GradientTransformation:
  """PyTorch's SGD as DARTS runs it: clip the raw gradient's global norm, add the
  decay, then momentum (`nesterov`: PyTorch's Nesterov form, as NAS-Bench-201 trains).
  `grad_clip=0` does not clip."""
  clip = (optax.stateless(lambda g, _: hypergrad.tree_clip_by_norm(g, grad_clip)) if grad_clip
          else optax.identity())
  return optax.chain(clip, optax.add_decayed_weights(weight_decay),
                     optax.sgd(lr_fn, momentum=momentum, nesterov=nesterov))


def drop_path_rate(prob: float, step, steps_per_epoch: int, epochs: int):
  """DARTS ramps drop-path linearly with the epoch: p * epoch / epochs."""
  return prob * (step // steps_per_epoch) / epochs


def cross_entropy(logits, labels, smoothing: float = 0.0):
  """The mean cross-entropy of integer labels; with `smoothing`, of smoothed one-hot targets."""
  if not smoothing:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
  return optax.softmax_cross_entropy(logits, targets).mean()


def accuracy(logits, labels):
  return jnp.mean(jnp.argmax(logits, -1) == labels)


def guarded(state: Any, new: Any, finite: jax.Array) -> Any:
  """The state after one step: `new` where the step was finite, else `state`
  unchanged with the step recorded in `bad_step` (the first such step; the host
  stops at its next check). The step counter advances either way."""
  kept = jax.lax.cond(finite, lambda: new, lambda: state)
  bad_step = jnp.where((state.bad_step < 0) & ~finite, state.step, state.bad_step)
  return kept.replace(step=state.step + 1, bad_step=bad_step)
