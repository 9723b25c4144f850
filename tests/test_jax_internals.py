"""The one module that touches `jax._src`: it works with the installed JAX and, where a private
name is gone, fails with one error naming the JAX versions it knows."""
import jax
import pytest
from jax._src import clusters
from jax._src import distributed

from audiomaepp import jax_internals
from audiomaepp.errors import UserError


def test_the_installed_jax_is_one_the_module_knows():
  assert jax.__version__ in jax_internals.KNOWN_JAX_VERSIONS


def test_cluster_detection_fills_nothing_in_when_everything_is_given():
  assert jax_internals.detect_cluster("127.0.0.1:1234", 2, 1, [0]) == (
      "127.0.0.1:1234", 2, 1, [0])


def test_the_client_before_initialisation_is_an_error_that_says_so():
  with pytest.raises(RuntimeError, match=r"jax.distributed.initialize\(\) has not been called"):
    jax_internals.coordination_client()


@pytest.mark.parametrize("module,name,call", [
    (distributed, "global_state", jax_internals.coordination_client),
    (clusters, "ClusterEnv", lambda: jax_internals.detect_cluster(None, None, None, None)),
])
def test_a_private_name_that_is_gone_is_one_line_naming_the_known_versions(monkeypatch, module,
                                                                           name, call):
  monkeypatch.delattr(module, name)
  with pytest.raises(jax_internals.UnsupportedJaxError) as error:
    call()
  assert isinstance(error.value, UserError)
  message = str(error.value)
  assert "\n" not in message and f"JAX {jax.__version__} has no jax._src." in message
  assert f"audiomaepp knows JAX {', '.join(jax_internals.KNOWN_JAX_VERSIONS)}" in message
