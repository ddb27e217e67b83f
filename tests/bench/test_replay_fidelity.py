"""bench.replay_fidelity --out: results merge into the file, which is always whole."""

import json
import os

import pytest

from bench import replay_fidelity

_KEYS = (
  "per_hardware",
  "structure_mismatch_patterns",
  "extent_mismatch_patterns",
  "skeletons",
  "seconds",
)


def test_out_merges_labels_and_a_failed_write_keeps_the_file(tmp_path, monkeypatch):
  out = str(tmp_path / "fidelity.json")
  with open(out, "w") as f:
    json.dump({"old": {"seconds": 1.0}}, f)
  monkeypatch.setattr(replay_fidelity, "run", lambda *a: {k: {} for k in _KEYS})
  replay_fidelity.main(["--out", out, "--label", "new"])
  doc = json.load(open(out))
  assert set(doc) == {"old", "new"} and doc["new"]["per_hardware"] == {}
  # A result JSON cannot encode: the write fails half-way, the previous file stays whole.
  monkeypatch.setattr(
    replay_fidelity, "run", lambda *a: dict({k: {} for k in _KEYS}, examples=[object()])
  )
  with pytest.raises(TypeError, match="not JSON serializable"):
    replay_fidelity.main(["--out", out, "--label", "bad"])
  assert json.load(open(out)) == doc
  assert os.listdir(tmp_path) == ["fidelity.json"]
