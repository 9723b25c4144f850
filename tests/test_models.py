"""Model behaviour on micro models: masking, layouts, init, dtypes, RoPE, SwiGLU norm, remat."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from audiomaepp import models
from audiomaepp.models import blocks
from audiomaepp.models import layout
from audiomaepp.train import step as step_lib
from audiomaepp import experiment
import micro_models
from conftest import experiment_config

BATCH = 2


def _spectrogram(seed=0):
  return np.random.default_rng(seed).normal(size=(BATCH, 200, 80)).astype(np.float32)


def _masks(seed, mode="unstructured"):
  return models.random_masking_ids(jax.random.key(seed), BATCH, (50, 5), 50, mode)


def test_unstructured_masking():
  ids_keep, ids_restore, mask = jax.device_get(_masks(1))
  assert ids_keep.shape == (BATCH, 50) and ids_restore.shape == mask.shape == (BATCH, 250)
  ids_shuffle = np.argsort(ids_restore, axis=1)
  np.testing.assert_array_equal(ids_shuffle[:, :50], ids_keep)
  np.testing.assert_array_equal(np.sort(ids_restore, axis=1), np.tile(np.arange(250), (BATCH, 1)))
  np.testing.assert_array_equal(mask.sum(axis=1), [200] * BATCH)
  for b in range(BATCH):
    assert len(set(ids_keep[b])) == 50
    np.testing.assert_array_equal(mask[b, ids_keep[b]], 0)
  other = jax.device_get(_masks(2)[0])
  assert not np.array_equal(np.sort(other, axis=1), np.sort(ids_keep, axis=1))


def test_timestep_masking_removes_whole_time_steps():
  _, _, mask = jax.device_get(_masks(3, "timestep"))
  per_step = mask.reshape(BATCH, 50, 5)
  np.testing.assert_array_equal(per_step, per_step[:, :, :1].repeat(5, axis=2))
  np.testing.assert_array_equal((per_step[:, :, 0] == 0).sum(axis=1), [10] * BATCH)


def test_restore_ids_from_keep_is_consistent():
  ids_keep = np.stack([np.random.default_rng(s).permutation(250)[:50] for s in range(BATCH)])
  ids_restore = np.asarray(models.restore_ids_from_keep(jnp.asarray(ids_keep), 250))
  np.testing.assert_array_equal(np.sort(ids_restore, axis=1), np.tile(np.arange(250), (BATCH, 1)))
  np.testing.assert_array_equal(np.argsort(ids_restore, axis=1)[:, :50], ids_keep)


def test_patchify_layout_and_inverse():
  x = _spectrogram()
  patches = np.asarray(models.patchify(x))
  assert patches.shape == (BATCH, 250, 64)
  for t, f in [(0, 0), (0, 4), (7, 2), (49, 4)]:
    np.testing.assert_array_equal(patches[:, t * 5 + f],
                                  x[:, 4 * t:4 * t + 4, 16 * f:16 * f + 16].reshape(BATCH, 64))
  np.testing.assert_array_equal(np.asarray(models.unpatchify(patches)), x)
  np.testing.assert_array_equal(np.asarray(models.patchify(x[:, None])), patches)


@pytest.mark.integration
@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "unrolled"])
def test_init_params_logical_axes_and_initialisation(scan_layers):
  config = models.resolve_model_config(dict(size=None, width=32, depth=1, num_heads=2,
                                            decoder_width=32, decoder_depth=1,
                                            scan_layers=scan_layers))
  model = models.MaskedAutoencoder(config)
  # A counter-based PRNG compiles much faster on CPU than threefry; the init is the same code.
  rng = jax.random.key(0, impl="unsafe_rbg")
  variables = micro_models.jit(lambda r: model.init({"params": r, "masking": r},
                                                   _spectrogram()))(rng)
  assert set(variables) == {"params"}
  params = models.unbox(variables)["params"]
  leaves = jax.tree.leaves(params)
  assert all(leaf.dtype == jnp.float32 for leaf in leaves)
  assert not any(leaf.shape[-2:] == (251, 32) for leaf in leaves)  # tables are constants
  assert jax.tree.structure(params) == jax.tree.structure(models.param_shapes(config))

  specs = nn.get_partition_spec(variables)["params"]
  layers_axis = ("layers",) if scan_layers else ()
  block_name = "blocks" if scan_layers else "block_0"
  assert specs["encoder"][block_name]["attn"]["qkv"]["kernel"] == jax.sharding.PartitionSpec(
      *layers_axis, "embed", "heads")
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
  shardings = nn.logical_to_mesh_sharding(specs, mesh, experiment.base_config().logical_axis_rules)
  assert shardings["encoder"][block_name]["swiglu"]["value"]["kernel"].spec == (
      jax.sharding.PartitionSpec(*(None,) * len(layers_axis), "fsdp", None))

  # The original's initialisation (docs/reference.md#initialisation).
  block = layout.unstack_blocks(params)["encoder"]["block_0"]
  qkv = np.asarray(block["attn"]["qkv"]["kernel"])
  bound = np.sqrt(6 / (32 + 3 * 32))  # Xavier-uniform of the fused (3D, D) matrix
  assert 0.95 * bound < np.abs(qkv).max() <= bound
  np.testing.assert_allclose(qkv.std(), bound / np.sqrt(3), rtol=0.1)
  conv = np.asarray(params["patch_embed"]["kernel"])
  assert conv.shape == (4, 16, 1, 32)
  conv_bound = np.sqrt(6 / (64 + 64 * 32))  # fan_in 64, fan_out D·64
  assert 0.95 * conv_bound < np.abs(conv).max() <= conv_bound
  for token in (params["cls_token"], params["decoder"]["mask_token"]):
    assert 0.012 < np.asarray(token).std() < 0.028
  np.testing.assert_array_equal(block["norm3"]["scale"], 1.0)
  np.testing.assert_array_equal(block["swiglu"]["norm"]["bias"], 0.0)
  np.testing.assert_array_equal(block["ffn1"]["fc1"]["bias"], 0.0)


def test_reconstruct_outputs_and_loss():
  config, variables, io = micro_models.fixture_model("maepp_micro")
  reconstruct, _ = micro_models.functions(config)
  x = io["x"][:, 0]
  ids_keep, ids_restore, _ = _masks(4)
  out = jax.device_get(reconstruct(variables, x, ids_keep, ids_restore))
  assert out["encoder_out"].shape == (BATCH, 51, 64)
  assert out["pred"].shape == out["target"].shape == (BATCH, 250, 64)
  np.testing.assert_array_equal(out["target"], np.asarray(models.patchify(x)))
  mask = out["mask"]
  np.testing.assert_array_equal(mask, np.asarray(_masks(4)[2]))
  errors = ((out["pred"] - out["target"]) ** 2).mean(axis=-1)
  np.testing.assert_allclose(out["loss"], (errors * mask).sum() / mask.sum(), rtol=1e-5)
  # Mask tokens are all alike, so any shuffle with the same kept ids gives the same result.
  derived = models.restore_ids_from_keep(ids_keep, 250)
  assert not np.array_equal(np.asarray(derived), np.asarray(ids_restore))
  again = jax.device_get(reconstruct(variables, x, ids_keep, derived))
  np.testing.assert_allclose(again["pred"], out["pred"], atol=1e-6)


def test_encode_frame_layouts():
  config, variables, io = micro_models.fixture_model("maepp_micro")
  _, encode = micro_models.functions(config)
  time_major = jax.device_get(encode(variables, io["x"], "time_major"))
  tokens = time_major["tokens"]
  assert tokens.shape == (BATCH, 50, 5, 64) and time_major["cls"].shape == (BATCH, 64)
  assert time_major["frames"].shape == (BATCH, 50, 320)
  for t in (0, 21, 49):  # frame t: the 5 frequency tokens of time step t
    np.testing.assert_array_equal(time_major["frames"][:, t],
                                  np.concatenate([tokens[:, t, f] for f in range(5)], axis=-1))
  original = jax.device_get(encode(variables, io["x"], "original"))["frames"]
  sequence = tokens.reshape(BATCH, 250, 64)
  for j in (0, 13, 49):  # the original's frame j: tokens j, 50 + j, ..., 200 + j
    np.testing.assert_array_equal(original[:, j],
                                  np.concatenate([sequence[:, f * 50 + j] for f in range(5)], -1))
  # Scene embeddings of the original layout are 5 means over 10-step segments
  # (docs/reference.md#quirks-of-the-original, b).
  np.testing.assert_allclose(original.mean(axis=1),
                             sequence.reshape(BATCH, 5, 50, 64).mean(axis=2).reshape(BATCH, 320),
                             atol=1e-5)


def _masked_bf16_config():
  config, _, _ = micro_models.fixture_model("maepp_micro")
  return dataclasses.replace(config, dtype="bfloat16", mask_mode="timestep", norm_pix_loss=True)


def test_random_masking_uses_the_masking_stream():
  _, variables, io = micro_models.fixture_model("maepp_micro")
  reconstruct, _ = micro_models.functions(_masked_bf16_config())
  masks = [jax.device_get(reconstruct(variables, io["x"], rngs={"masking": jax.random.key(s)}))
           ["mask"] for s in (0, 1, 0)]
  assert not np.array_equal(masks[0], masks[1])
  np.testing.assert_array_equal(masks[0], masks[2])
  for mask in masks:  # 'timestep' mode
    per_step = mask.reshape(BATCH, 50, 5)
    np.testing.assert_array_equal(per_step, per_step[:, :, :1].repeat(5, axis=2))
    np.testing.assert_array_equal(mask.sum(axis=1), [200] * BATCH)


def test_bfloat16_compute_and_norm_pix_targets():
  config, variables, io = micro_models.fixture_model("maepp_micro")
  reconstruct, _ = micro_models.functions(_masked_bf16_config())
  low = jax.device_get(reconstruct(variables, io["x"], rngs={"masking": jax.random.key(3)}))
  assert low["encoder_out"].dtype == low["pred"].dtype == jnp.bfloat16
  assert low["loss"].dtype == jnp.float32
  target = low["target"]
  np.testing.assert_allclose(target.mean(axis=-1), 0.0, atol=1e-5)
  np.testing.assert_allclose(target.std(axis=-1, ddof=1), 1.0, atol=1e-3)
  reconstruct32, _ = micro_models.functions(config)
  high = jax.device_get(reconstruct32(variables, io["x"], low["ids_keep"], low["ids_restore"]))
  np.testing.assert_allclose(low["encoder_out"].astype(np.float32), high["encoder_out"],
                             atol=0.1)
  expected = models.masked_mse(high["pred"], target, high["mask"])
  np.testing.assert_allclose(low["loss"], expected, rtol=0.05)


BF16_RELATIVE_ERROR = 1.9e-2


@pytest.mark.integration
def test_bfloat16_keeps_a_float32_residual_stream():
  """Tiny (random init) in bfloat16 vs float32 on the same weights: relative error of the
  encoder tokens 1.69e-2 with float32 residuals, 2.16e-2 when the residual stream was bfloat16."""
  config = models.resolve_model_config(experiment_config("tiny").model)
  model = models.MaskedAutoencoder(config)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(BATCH, 200, 80)), jnp.float32)
  rng = jax.random.key(0, impl="unsafe_rbg")
  variables = micro_models.jit(lambda r: model.init({"params": r, "masking": r}, x[:1]))(rng)
  tokens = {}
  for dtype in ("float32", "bfloat16"):
    low = models.MaskedAutoencoder(dataclasses.replace(config, dtype=dtype))
    encode = micro_models.jit(lambda v, x, m=low: m.apply(v, x, method=m.encode)["tokens"])
    tokens[dtype] = np.asarray(encode(variables, x), np.float32)
  error = np.linalg.norm(tokens["bfloat16"] - tokens["float32"]) / np.linalg.norm(
      tokens["float32"])
  assert 1e-3 < error < BF16_RELATIVE_ERROR


@pytest.mark.integration
def test_rope_patch_2d_uses_true_positions():
  sequence, variables, io = micro_models.fixture_model("maepp_micro_rope")
  two_d = dataclasses.replace(sequence, encoder_rope="patch_2d", decoder_rope="patch_2d")
  x = io["x"]
  ids_keep = np.asarray(io["ids_keep"])
  permutation = np.random.default_rng(0).permutation(50)
  runs = {}
  for name, config in (("patch_2d", two_d), ("sequence", sequence)):
    reconstruct, _ = micro_models.functions(config)
    runs[name] = [jax.device_get(reconstruct(variables, x, ids,
                                             models.restore_ids_from_keep(ids, 250)))
                  for ids in (ids_keep, ids_keep[:, permutation])]
  first, second = runs["patch_2d"]
  # True positions: permuting the kept tokens permutes the outputs and nothing else.
  np.testing.assert_allclose(second["encoder_out"][:, 1:],
                             first["encoder_out"][:, 1:][:, permutation], atol=1e-5)
  np.testing.assert_allclose(second["encoder_out"][:, 0], first["encoder_out"][:, 0], atol=1e-5)
  np.testing.assert_allclose(second["pred"], first["pred"], atol=1e-5)
  first_seq, second_seq = runs["sequence"]
  assert np.abs(first_seq["encoder_out"] - first["encoder_out"]).max() > 1e-2
  # The original semantics depend on the (arbitrary) order of the kept tokens.
  assert np.abs(second_seq["encoder_out"][:, 1:]
                - first_seq["encoder_out"][:, 1:][:, permutation]).max() > 1e-2


@pytest.mark.integration
def test_swiglu_norm_modes():
  _, variables, _ = micro_models.fixture_model("maepp_micro", scan_layers=False)
  params = {"params": variables["params"]["encoder"]["block_0"]}
  changed = jax.tree_util.tree_map_with_path(
      lambda path, v: v * 3.0 + 1.0 if "norm3" in jax.tree_util.keystr(path) else v, params)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(BATCH, 9, 64)), jnp.float32)
  for swiglu_norm, uses_norm3 in (("shared", False), ("separate", True)):
    block = blocks.PlusPlusBlock(num_heads=4, swiglu_norm=swiglu_norm)
    apply = micro_models.jit(block.apply)
    difference = jnp.abs(apply(changed, x) - apply(params, x)).max()
    assert bool(difference > 1e-3) == uses_norm3


def _checkpoints(jaxpr):
  """The remat equations of a jaxpr and of every jaxpr nested in it (scan bodies)."""
  return [eqn for eqn in micro_models.equations(jaxpr)
          if eqn.primitive.name.startswith(("checkpoint", "remat"))]


@pytest.mark.integration
@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "unrolled"])
def test_remat_policy_wraps_every_block(scan_layers):
  config, variables, io = micro_models.fixture_model("maepp_micro", scan_layers)
  # One remat per block body: per block when unrolled, once per scanned stack.
  per_model = 2 if scan_layers else config.depth + config.decoder_depth
  for remat, expected, policy in (("none", 0, None), ("full", per_model, None),
                                  ("dots", per_model,
                                   jax.checkpoint_policies.dots_with_no_batch_dims_saveable)):
    model = models.MaskedAutoencoder(dataclasses.replace(config, remat=remat))
    loss = lambda v, model=model: model.apply(v, io["x"], io["ids_keep"], io["ids_restore"])["loss"]
    checkpoints = _checkpoints(jax.make_jaxpr(jax.grad(loss))(variables).jaxpr)
    assert len(checkpoints) == expected, remat
    assert all(eqn.params["policy"] is policy for eqn in checkpoints), remat


def test_legacy_remat_bool_keeps_unrolled_layout():
  resolve = models.resolve_model_config
  assert resolve({"remat": True}).remat == "full"
  assert not resolve({"remat": False}).scan_layers  # a config.json from before scanning
  assert resolve({"remat": False, "scan_layers": True}).scan_layers
  assert resolve({}).scan_layers and resolve({}).remat == "none"
  with pytest.raises(ValueError, match="config.model.remat='some'"):
    resolve({"remat": "some"})


def test_wrong_input_shape_is_named():
  config, variables, _ = micro_models.fixture_model("maepp_micro")
  model = models.MaskedAutoencoder(config)
  with pytest.raises(ValueError, match=r"expected \(batch, 200, 80\)"):
    model.apply(variables, jnp.zeros((1, 80, 200)), method=model.encode)


def test_eval_reconstruction_undoes_norm_pix_with_the_loss_statistics():
  """The picture's reconstruction is pred * sqrt(unbiased var + 1e-6) + mean of each patch:
  the inverse of the targets the loss used (computed here with NumPy)."""
  config, variables, io = micro_models.fixture_model("maepp_micro")
  config = dataclasses.replace(config, norm_pix_loss=True)
  module = models.build_model(config)
  rng = jax.random.key(5)
  evaluate = micro_models.jit(functools.partial(step_lib.eval_step, model=module))
  out = jax.device_get(evaluate(variables["params"], {"spectrogram": io["x"]}, rng))
  reconstruct, _ = micro_models.functions(config)
  pred = np.asarray(jax.device_get(reconstruct(variables, io["x"], rngs={"masking": rng}))["pred"][0])
  patches = np.asarray(models.patchify(io["x"][:1], config.patch_size))[0]
  expected = pred * np.sqrt(patches.var(axis=-1, ddof=1, keepdims=True) + 1e-6) + patches.mean(
      axis=-1, keepdims=True)
  got = np.asarray(models.patchify(out["reconstruction"][None], config.patch_size))[0]
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
