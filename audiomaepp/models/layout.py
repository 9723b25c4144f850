"""Block parameter layouts: stacked (`nn.scan`, `scan_layers=True`) and per-block (unrolled).

Stacked: `encoder/blocks/<leaf>` with a leading depth axis. Per-block: `encoder/block_0/<leaf>`,
`encoder/block_1/<leaf>`, ... (also the original checkpoints' layout). The same holds for the
decoder. Conversion is exact (a stack or a slice) and works on NumPy or JAX arrays.
"""
from typing import Any, Mapping, Tuple

import jax
import jax.numpy as jnp

STACKED = "blocks"
PARTS = ("encoder", "decoder")


def _block_name(i: int) -> str:
  return f"block_{i}"


def _per_block_count(part: Mapping[str, Any]) -> int:
  count = 0
  while _block_name(count) in part:
    count += 1
  return count


def stack_blocks(params: Mapping[str, Any]) -> dict:
  """Per-block parameters -> stacked (unchanged where already stacked)."""
  out = dict(params)
  for name in PARTS:
    part = dict(params.get(name, {}))
    depth = _per_block_count(part)
    if not depth:
      continue
    per_block = [part.pop(_block_name(i)) for i in range(depth)]
    part[STACKED] = jax.tree.map(lambda *xs: jnp.stack(xs), *per_block)
    out[name] = part
  return out


def unstack_blocks(params: Mapping[str, Any]) -> dict:
  """Stacked parameters -> per-block (unchanged where already per-block)."""
  out = dict(params)
  for name in PARTS:
    part = dict(params.get(name, {}))
    if STACKED not in part:
      continue
    stacked = part.pop(STACKED)
    depth = jax.tree.leaves(stacked)[0].shape[0]
    for i in range(depth):
      part[_block_name(i)] = jax.tree.map(lambda x, i=i: x[i], stacked)
    out[name] = part
  return out


def to_layout(params: Mapping[str, Any], scan_layers: bool) -> dict:
  """`params` in the layout of a model with `scan_layers` (either layout in)."""
  return stack_blocks(params) if scan_layers else unstack_blocks(params)


def per_block_ndim(path: Tuple[str, ...], leaf: Any) -> int:
  """Dimensions of a parameter as one block holds it: without the leading depth axis of a
  stacked block parameter (`path` as in `flax.traverse_util.flatten_dict`)."""
  stacked = len(path) > 2 and path[0] in PARTS and path[1] == STACKED
  return leaf.ndim - 1 if stacked else leaf.ndim
