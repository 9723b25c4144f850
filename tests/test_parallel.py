"""Mesh construction, logical-axis shardings, and 1-vs-8-device equality of training losses."""
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from audiomaepp import models
from audiomaepp import parallel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mesh_config(data, fsdp):
  return ml_collections.ConfigDict({"data": data, "fsdp": fsdp})


@pytest.mark.parametrize("data,fsdp,expected", [(-1, 1, (8, 1)), (2, -1, (2, 4)), (-1, 4, (2, 4)),
                                                (8, 1, (8, 1))])
def test_mesh_shape_fills_remaining_devices(data, fsdp, expected):
  assert parallel.mesh_shape(_mesh_config(data, fsdp), 8) == expected


@pytest.mark.parametrize("data,fsdp", [(3, 1), (-1, 3), (-1, -1), (2, 2)])
def test_mesh_shape_rejects_bad_sizes(data, fsdp):
  with pytest.raises(ValueError, match="config.mesh"):
    parallel.mesh_shape(_mesh_config(data, fsdp), 8)


def test_param_shardings_follow_rules_and_divisibility():
  """'embed' goes to fsdp where the axis divides the dimension; other dims stay replicated."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), parallel.MESH_AXES)
  boxed = {
      "kernel": nn.Partitioned(jax.ShapeDtypeStruct((64, 256), jnp.float32), ("embed", "mlp")),
      "bias": nn.Partitioned(jax.ShapeDtypeStruct((256,), jnp.float32), ("mlp",)),
      "plain": jax.ShapeDtypeStruct((3, 5), jnp.float32),
  }
  config = ml_collections.ConfigDict({
      "shard_params": True,
      "logical_axis_rules": (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", None))})
  rules = parallel.axis_rules(config)
  # A 1x1 mesh divides everything but a size-1 axis is pointless: specs come out replicated.
  shardings = parallel.param_shardings(boxed, mesh, rules)
  assert shardings["kernel"].spec == PartitionSpec(None, None)
  # The divisibility rule on a (pretend) 4-way fsdp axis, checked on specs directly.
  fake_mesh = type("M", (), {"shape": {"data": 2, "fsdp": 4}})()
  assert parallel._divisible_spec(PartitionSpec("fsdp", None), (64, 256), fake_mesh) == \
      PartitionSpec("fsdp", None)
  assert parallel._divisible_spec(PartitionSpec("fsdp"), (6,), fake_mesh) == PartitionSpec(None)
  assert parallel._divisible_spec(PartitionSpec(("data", "fsdp")), (16,), fake_mesh) == \
      PartitionSpec(("data", "fsdp"))
  config.shard_params = False
  assert dict(parallel.axis_rules(config)) == {"batch": ("data", "fsdp"), "embed": None,
                                               "mlp": None}


def test_single_process_needs_no_distributed_init(monkeypatch):
  for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS",
               "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(name, raising=False)
  assert not parallel.initialize_distributed()
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert parallel.cluster_detected()
  monkeypatch.setenv("SLURM_NTASKS", "1")
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "host-0,host-1")
  assert parallel.cluster_detected()


def _host_initial_state(task, tx, config):
  """A NumPy train state (scaled normal weights, AdamW zeros): no init program to compile."""
  from audiomaepp.train import runner  # pylint: disable=g-import-not-at-top
  mesh = parallel.create_mesh(config.mesh, jax.devices()[:1])
  abstract, _ = runner.state_shardings(task, tx, mesh, parallel.axis_rules(config))
  rng = np.random.default_rng(0)

  def param(path, x):
    name = path[-1].key
    if name == "scale":
      return np.ones(x.shape, x.dtype)
    if name == "bias":
      return np.zeros(x.shape, x.dtype)
    return (rng.normal(size=x.shape) / np.sqrt(np.prod(x.shape[:-1]))).astype(x.dtype)

  return abstract.replace(
      step=np.zeros((), np.int32),
      params=jax.tree_util.tree_map_with_path(param, abstract.params),
      opt_state=jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract.opt_state))


def _parity_losses():
  """Runs in a subprocess with 8 simulated devices: losses of 3 steps on three meshes."""
  from audiomaepp.data import pipeline  # pylint: disable=g-import-not-at-top
  from audiomaepp.train import optim, pretrain, runner  # pylint: disable=g-import-not-at-top
  from audiomaepp import experiment  # pylint: disable=g-import-not-at-top

  assert jax.device_count() == 8, jax.devices()
  config = experiment.base_config("tiny")
  config.model.update(width=64, depth=1, num_heads=4, decoder_width=32, decoder_depth=1,
                      decoder_num_heads=4)
  config.update(batch_size=16, num_train_steps=3, warmup_epochs=0, base_lr=1e-2)
  task = pretrain.PretrainTask(config)
  schedule = optim.learning_rate_schedule(config, 160, 3)
  tx = optim.create_optimizer(config, schedule)
  batches = np.random.default_rng(0).normal(size=(3, 16, 200, 80)).astype(np.float32)
  initial = _host_initial_state(task, tx, config)
  results = {}
  for name, (data, fsdp, shard), devices in (("single", (1, 1, False), jax.devices()[:1]),
                                            ("data", (8, 1, False), None),
                                            ("data_fsdp", (2, 4, True), None)):
    config.mesh.update(data=data, fsdp=fsdp)
    config.shard_params = shard
    mesh = parallel.create_mesh(config.mesh, devices)
    _, shardings = runner.state_shardings(task, tx, mesh, parallel.axis_rules(config))
    state = jax.device_put(initial, shardings)
    train_fn = runner.compile_train_step(task, tx, schedule, runner.Placement.create(
        mesh, parallel.DEFAULT_RULES, shardings, 16))
    rng = jax.device_put(jax.random.PRNGKey(1), parallel.replicated(mesh))
    losses = []
    for batch in batches:
      global_batch = pipeline.make_global_batch({"spectrogram": batch},
                                                parallel.batch_sharding(mesh))
      state, step_metrics = train_fn(state, global_batch, rng)
      losses.append(float(step_metrics["loss"]))
    sharded = sorted({str(x.sharding.spec) for x in jax.tree.leaves(state.params)
                      if "fsdp" in str(x.sharding.spec)})
    results[name] = {"losses": losses, "fsdp_specs": sharded,
                     "devices": len(state.step.sharding.device_set)}
  print(json.dumps(results))


@pytest.mark.integration
def test_eight_devices_match_one_device():
  # Eight simulated CPU devices; XLA's quickest compile (the test is dominated by compilation).
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS=("--xla_force_host_platform_device_count=8 "
                        "--xla_backend_optimization_level=0"))
  proc = subprocess.run([sys.executable, __file__], env=env, cwd=REPO, capture_output=True,
                        text=True, timeout=540)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(proc.stdout.strip().splitlines()[-1])
  single = np.array(results["single"]["losses"])
  assert results["single"]["devices"] == 1
  assert results["data"]["devices"] == 8 and results["data_fsdp"]["devices"] == 8
  assert not results["data"]["fsdp_specs"], "pure data parallel must replicate parameters"
  assert results["data_fsdp"]["fsdp_specs"], "FSDP must shard some parameters"
  assert single[-1] < single[0]  # training moves (a frozen model would also "match")
  for mode in ("data", "data_fsdp"):
    np.testing.assert_allclose(results[mode]["losses"], single, rtol=0, atol=1e-5)


if __name__ == "__main__":
  _parity_losses()


def test_batch_sharding_follows_the_batch_rule():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), parallel.MESH_AXES)
  assert parallel.batch_sharding(mesh).spec == PartitionSpec(("data", "fsdp"))
  assert parallel.batch_sharding(mesh, (("batch", "data"), ("embed", "fsdp"))).spec == \
      PartitionSpec("data")


def _sharding_constraints(jaxpr):
  """Specs of the sharding constraints in a jaxpr and the jaxprs nested in it (scan bodies)."""
  import micro_models  # pylint: disable=g-import-not-at-top
  return [eqn.params["sharding"].spec for eqn in micro_models.equations(jaxpr)
          if eqn.primitive.name == "sharding_constraint"]


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "unrolled"])
def test_block_boundary_activations_follow_the_batch_rule(scan_layers):
  import micro_models  # pylint: disable=g-import-not-at-top
  config, variables, io = micro_models.fixture_model("maepp_micro", scan_layers)
  model = models.MaskedAutoencoder(config)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), parallel.MESH_AXES)
  apply = lambda v, x: model.apply(v, x, io["ids_keep"], io["ids_restore"])["loss"]
  assert not _sharding_constraints(jax.make_jaxpr(apply)(variables, io["x"]).jaxpr)
  rules = (("batch", "data"), ("embed", "fsdp"))
  constrained = parallel.with_axis_rules(apply, mesh, rules)
  specs = _sharding_constraints(jax.make_jaxpr(constrained)(variables, io["x"]).jaxpr)
  # Each stack's input and every block's output (once per scanned stack body).
  expected = 4 if scan_layers else 2 + config.depth + config.decoder_depth
  assert specs == [PartitionSpec("data", None, None)] * expected
