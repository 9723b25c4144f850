"""CI's rule for skipped tests: only those listed with a reason in tests/allowed_skips.txt."""
import pytest

import conftest


def test_the_allowed_list_parses_and_every_entry_has_a_reason():
  assert all(reason for reason in conftest.allowed_skips().values())


def test_unlisted_skips_are_reported_and_listed_ones_pass(tmp_path):
  listed = tmp_path / "allowed.txt"
  listed.write_text("# comment\ntests/test_gpu.py::test_on_gpu  # needs a GPU\n")
  allowed = conftest.allowed_skips(listed)
  assert allowed == {"tests/test_gpu.py::test_on_gpu": "needs a GPU"}
  skipped = ["tests/test_gpu.py::test_on_gpu[bf16]", "tests/test_export.py::test_pth"]
  assert conftest.unexpected_skips(skipped, allowed) == ["tests/test_export.py::test_pth"]


def test_an_entry_without_a_reason_is_refused(tmp_path):
  listed = tmp_path / "allowed.txt"
  listed.write_text("tests/test_gpu.py::test_on_gpu\n")
  with pytest.raises(ValueError, match="allowed.txt:1: tests/test_gpu.py::test_on_gpu has no "
                     "reason"):
    conftest.allowed_skips(listed)
