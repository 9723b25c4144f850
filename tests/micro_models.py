"""Micro models shared by the model tests: fixture weights and jitted functions compiled once.

XLA compilation dominates these tests on CPU, so every config's functions are cached for the
whole session, compiled without backend optimisations (about half the compile time, same
numbers within float32 rounding), and tests reuse the fixture models instead of new inits.
"""
import dataclasses
import functools
from typing import Iterator

import jax
import numpy as np

from audiomaepp import models
from audiomaepp import original
from audiomaepp.models import layout
from conftest import FIXTURES

FAST_COMPILE = {"xla_backend_optimization_level": 0}


def jit(fun, **kwargs):
  """jax.jit with FAST_COMPILE."""
  return jax.jit(fun, compiler_options=FAST_COMPILE, **kwargs)


@functools.lru_cache(maxsize=None)
def fixture_model(name, scan_layers=True):
  """(ModelConfig, variables, io arrays) of fixture `name`, loaded with `original.load`, in the
  stacked (`scan_layers`) or per-block layout."""
  model_config, variables = original.load(FIXTURES / f"{name}_weights.npz",
                                          FIXTURES / f"{name}_config.json")
  io = dict(np.load(FIXTURES / f"{name}_io.npz"))
  config = dataclasses.replace(models.resolve_model_config(model_config), scan_layers=scan_layers)
  return config, {"params": layout.to_layout(variables["params"], scan_layers)}, io


@functools.lru_cache(maxsize=None)
def functions(config):
  """Jitted `reconstruct(variables, x, ids_keep, ids_restore)`, `encode(variables, x, layout)`."""
  model = models.MaskedAutoencoder(config)
  reconstruct = jit(model.apply)
  encode = jit(lambda v, x, layout: model.apply(v, x, frame_layout=layout, method=model.encode),
               static_argnums=2)
  return reconstruct, encode


def equations(jaxpr) -> Iterator:
  """Every equation of a jaxpr and of the jaxprs nested in it (scan and remat bodies), in order."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else (param,):
        inner = getattr(sub, "jaxpr", None)
        if inner is not None:
          yield from equations(getattr(inner, "jaxpr", inner))
