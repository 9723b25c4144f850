"""The model section of a config, validated and resolved to plain numbers.

`resolve_model_config` turns `config.model` (see configs/common.py:model_config; fields left out
take those defaults) into a frozen `ModelConfig`, so that a bad config fails with one clear line
before anything is traced or compiled.
"""
import dataclasses
from typing import Any, Mapping, Optional, Tuple

import jax.numpy as jnp

from configs import common

BLOCKS = ("plusplus", "vit")
ROPE_MODES = ("none", "sequence", "patch_2d")
MASK_MODES = ("unstructured", "timestep")
FRAME_LAYOUTS = ("time_major", "original")
SWIGLU_NORMS = ("shared", "separate")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ATTENTION_IMPLS = (None, "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Every number of the model, resolved from `config.model` (hashable: a linen attribute)."""
  size: Optional[str]
  width: int
  depth: int
  num_heads: int
  decoder_width: int
  decoder_depth: int
  decoder_num_heads: int
  mlp_ratio: float
  input_shape: Tuple[int, int]  # (time frames, mel bins)
  patch_size: Tuple[int, int]  # (time, mel)
  encoder_block: str
  decoder_block: str
  swiglu_norm: str
  encoder_rope: str
  decoder_rope: str
  mask_ratio: float
  mask_mode: str
  norm_pix_loss: bool
  frame_layout: str
  dtype: str
  remat: bool
  attention_impl: Optional[str]

  @property
  def grid(self) -> Tuple[int, int]:
    """Patch grid (time patches, frequency patches), e.g. (50, 5)."""
    return (self.input_shape[0] // self.patch_size[0], self.input_shape[1] // self.patch_size[1])

  @property
  def num_patches(self) -> int:
    return self.grid[0] * self.grid[1]

  @property
  def patch_dim(self) -> int:
    """Values per patch vector (time x mel inside a patch), e.g. 64."""
    return self.patch_size[0] * self.patch_size[1]

  @property
  def num_keep(self) -> int:
    """Patches the encoder sees in training; the original's int(L * (100 - 100 r) / 100)."""
    return int(self.num_patches * (100 - self.mask_ratio * 100) / 100)

  @property
  def compute_dtype(self) -> Any:
    return DTYPES[self.dtype]

  def to_dict(self) -> dict:
    """The fields as a plain dict (the form of `config.model`)."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _choice(fields: Mapping[str, Any], name: str, allowed) -> Any:
  value = fields[name]
  if value not in allowed:
    raise ValueError(f"config.model.{name}={value!r}: expected one of {list(allowed)}")
  return value


def _pair(fields: Mapping[str, Any], name: str) -> Tuple[int, int]:
  value = fields[name]
  try:
    pair = tuple(int(v) for v in value)
  except TypeError:
    pair = ()
  if len(pair) != 2 or min(pair) <= 0:
    raise ValueError(f"config.model.{name}={value!r}: expected two positive integers")
  return pair


def _check_heads(width: int, heads: int, width_name: str, heads_name: str) -> None:
  if width <= 0 or heads <= 0 or width % heads:
    raise ValueError(f"config.model.{heads_name}={heads} must be positive and divide "
                     f"config.model.{width_name}={width}")


def _check_rope(mode: str, width: int, heads: int, name: str) -> None:
  # RoPE rotates channel pairs; 'patch_2d' gives half of the head dims to each grid axis.
  multiple = {"none": 1, "sequence": 2, "patch_2d": 4}[mode]
  if (width // heads) % multiple:
    raise ValueError(f"config.model.{name}={mode!r} needs a head dim divisible by {multiple}, "
                     f"got {width // heads}")


def resolve_model_config(model_config: Any) -> ModelConfig:
  """Validates `config.model` (ConfigDict, mapping or ModelConfig) and fills in every number.

  Raises:
    ValueError: one line naming the offending field (unknown field or size, patch not dividing
      the input, mask ratio outside (0, 1), heads not dividing the width, unknown mode names).
  """
  if isinstance(model_config, ModelConfig):
    return model_config
  given = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
  fields = common.model_config().to_dict()
  unknown = sorted(set(given) - set(fields))
  if unknown:
    raise ValueError(f"config.model has unknown fields {unknown}; known: {sorted(fields)}")
  fields.update(given)

  size = fields["size"]
  explicit = [fields[k] for k in ("width", "depth", "num_heads")]
  if size is None and None in explicit:
    raise ValueError("config.model.size is None: set width, depth and num_heads instead")
  if size is not None and size not in common.ENCODER_SIZES:
    raise ValueError(f"config.model.size={size!r}: expected one of {list(common.ENCODER_SIZES)}")
  defaults = common.ENCODER_SIZES[size] if size is not None else explicit
  width, depth, num_heads = (int(d if e is None else e) for e, d in zip(explicit, defaults))

  input_shape = _pair(fields, "input_shape")
  patch_size = _pair(fields, "patch_size")
  for axis, (n, p) in enumerate(zip(input_shape, patch_size)):
    if n % p:
      raise ValueError(f"config.model.patch_size={patch_size} does not divide "
                       f"config.model.input_shape={input_shape} along axis {axis}")
  mask_ratio = float(fields["mask_ratio"])
  if not 0.0 < mask_ratio < 1.0:
    raise ValueError(f"config.model.mask_ratio={mask_ratio}: expected a value in (0, 1)")
  mlp_ratio = float(fields["mlp_ratio"])
  if mlp_ratio <= 0:
    raise ValueError(f"config.model.mlp_ratio={mlp_ratio}: expected a positive number")
  if depth <= 0 or int(fields["decoder_depth"]) <= 0:
    raise ValueError(f"config.model.depth={depth} and decoder_depth={fields['decoder_depth']} "
                     "must be positive")
  decoder_width = int(fields["decoder_width"])
  decoder_num_heads = int(fields["decoder_num_heads"])
  _check_heads(width, num_heads, "width", "num_heads")
  _check_heads(decoder_width, decoder_num_heads, "decoder_width", "decoder_num_heads")
  encoder_rope = _choice(fields, "encoder_rope", ROPE_MODES)
  decoder_rope = _choice(fields, "decoder_rope", ROPE_MODES)
  _check_rope(encoder_rope, width, num_heads, "encoder_rope")
  _check_rope(decoder_rope, decoder_width, decoder_num_heads, "decoder_rope")

  config = ModelConfig(
      size=size,
      width=width,
      depth=depth,
      num_heads=num_heads,
      decoder_width=decoder_width,
      decoder_depth=int(fields["decoder_depth"]),
      decoder_num_heads=decoder_num_heads,
      mlp_ratio=mlp_ratio,
      input_shape=input_shape,
      patch_size=patch_size,
      encoder_block=_choice(fields, "encoder_block", BLOCKS),
      decoder_block=_choice(fields, "decoder_block", BLOCKS),
      swiglu_norm=_choice(fields, "swiglu_norm", SWIGLU_NORMS),
      encoder_rope=encoder_rope,
      decoder_rope=decoder_rope,
      mask_ratio=mask_ratio,
      mask_mode=_choice(fields, "mask_mode", MASK_MODES),
      norm_pix_loss=bool(fields["norm_pix_loss"]),
      frame_layout=_choice(fields, "frame_layout", FRAME_LAYOUTS),
      dtype=_choice(fields, "dtype", tuple(DTYPES)),
      remat=bool(fields["remat"]),
      attention_impl=_choice(fields, "attention_impl", ATTENTION_IMPLS),
  )
  if config.attention_impl == "cudnn" and config.dtype == "float32":
    raise ValueError("config.model.attention_impl='cudnn' needs config.model.dtype 'bfloat16' "
                     "or 'float16'")
  if config.num_keep < 1:
    raise ValueError(f"config.model.mask_ratio={mask_ratio} keeps no patch of "
                     f"{config.num_patches}")
  return config
