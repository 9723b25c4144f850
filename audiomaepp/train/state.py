"""The train state every task keeps: step, parameters, optimiser state and, optionally, the
exponential moving average of the parameters."""
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


class TrainState(flax.struct.PyTreeNode):
  """Everything that changes during training. Parameters and optimiser state are float32;
  `ema_params` is the parameters' moving average when a task keeps one, else {}."""
  step: jax.Array  # () int32: train steps done (micro-batches, with gradient accumulation)
  params: Any
  opt_state: Any
  ema_params: Any = flax.struct.field(default_factory=dict)

  def checkpoint_items(self) -> tuple[Any, dict[str, Any]]:
    """(params, the rest) as stored in the checkpoint items `params` and `train_state`."""
    rest = {"step": self.step, "opt_state": self.opt_state}
    if self.ema_params:
      rest["ema_params"] = self.ema_params
    return self.params, rest

  @classmethod
  def from_checkpoint_items(cls, params: Any, rest: dict[str, Any]) -> "TrainState":
    """Inverse of `checkpoint_items`."""
    return cls(step=rest["step"], params=params, opt_state=rest["opt_state"],
               ema_params=rest.get("ema_params", {}))

  def eval_params(self) -> Any:
    """The parameters evaluated: the moving average when kept, else the trained ones."""
    return self.ema_params if self.ema_params else self.params


def new_state(params: Any, tx: optax.GradientTransformation, ema: bool = False) -> TrainState:
  """Step 0 of `params` (unboxed): fresh optimiser state, and a copy as the moving average when
  `ema`."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema_params=jax.tree.map(jnp.copy, params) if ema else {})
