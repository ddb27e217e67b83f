"""Tests of the measure-record reader: labels, bad lines, fast path == full parse."""

import glob
import json
import math
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tlp_jax.core import features as F
from tlp_jax.core import records as R

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "records")
SAMPLE = os.path.join(REPO, "data", "sample", "tenset-mini", "measure_records")
B5DE9 = '["b5de9ba85ef9f559d4479d25db4a9ecf", [4, 8, 8, 512], [4, 1, 1, 512]]'


def _fixture(name):
  return os.path.join(FIXTURES, name)


def _assert_same(a: R.TaskFile, b: R.TaskFile):
  for field in ("features", "costs", "scores", "program_keys", "line_numbers"):
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
    assert getattr(a, field).dtype == getattr(b, field).dtype
  assert (a.min_cost == b.min_cost) or (math.isnan(a.min_cost) and math.isnan(b.min_cost))
  for field in ("workload_key", "target", "hardware", "platform", "layout"):
    assert getattr(a, field) == getattr(b, field), field
  da, db = a.stats.to_dict(), b.stats.to_dict()
  da.pop("fast_path_lines")
  db.pop("fast_path_lines")
  assert da == db


def _invariant(stats: R.ReadStats):
  assert stats.lines == stats.kept + stats.num_failed + stats.num_malformed


def test_labels_by_hand():
  tf = R.read_task_file(_fixture("labels_task.json"))
  assert tf.workload_key == B5DE9
  assert tf.target == "llvm -keys=cpu -mcpu=znver4 -model=epyc-9004"
  assert tf.hardware == "epyc-9004" and tf.platform == "llvm"
  # costs: [2e-5, 4e-5] -> 3e-5; [1e-5] -> 1e-5; [1e-5, 2e-5, 3e-5] -> 2e-5; error; [5e-6].
  np.testing.assert_array_equal(tf.line_numbers, [1, 2, 3, 5])
  np.testing.assert_allclose(tf.costs, [3e-5, 1e-5, 2e-5, 5e-6], rtol=1e-15)
  assert tf.min_cost == 5e-6
  np.testing.assert_allclose(tf.scores, [1 / 6, 0.5, 0.25, 1.0], rtol=1e-12)
  assert tf.scores.max() == 1.0 and (tf.scores > 0).all()
  # Bit-identical to the original's np.mean per record.
  assert tf.costs[0] == np.mean([2e-05, 4e-05]) and tf.costs[2] == np.mean([1e-5, 2e-5, 3e-5])
  assert tf.stats.failed == {"error_code": 1} and tf.stats.kept == 4
  # Line 5 measures line 1's program again: same key; the others differ.
  assert tf.program_keys.dtype == np.uint64
  assert tf.program_keys[0] == tf.program_keys[3]
  assert len(set(tf.program_keys[:3].tolist())) == 3
  with open(_fixture("labels_task.json")) as f:
    steps = json.loads(f.readline())["i"][1][1]
  assert int(tf.program_keys[0]) == F.program_key(F.canonical_steps_json(steps))
  assert tf.features.shape == (4, 25, 22) and tf.features.dtype == np.float32
  np.testing.assert_array_equal(tf.features[0], F.featurize(steps))
  np.testing.assert_array_equal(tf.features[0], tf.features[3])


def test_mean_costs_match_numpy_mean_for_mixed_lengths():
  rng = np.random.default_rng(0)
  costs = [list(rng.uniform(1e-6, 1e-3, size=n)) for n in [1, 2, 3, 7, 8, 9, 10, 16, 17, 3, 10]]
  got = R.mean_costs(costs)
  assert got.tolist() == [np.mean(c) for c in costs]
  same = [list(rng.uniform(1e-6, 1e-3, size=10)) for _ in range(20)]
  assert R.mean_costs(same).tolist() == [np.mean(c) for c in same]


def test_every_kind_of_bad_line_is_counted_and_skipped():
  path = _fixture("bad_lines.json")
  for fast in (True, False):
    tf = R.read_task_file(path, fast=fast)
    s = tf.stats
    assert s.lines == 23 and s.kept == 2 and s.files == 1
    assert dict(s.malformed) == {
      "blank_line": 1,
      "invalid_json": 1,
      "not_an_object": 1,
      "wrong_version": 2,
      "bad_input": 1,
      "bad_steps": 2,
      "bad_result": 3,
      "workload_mismatch": 1,
      "target_mismatch": 1,
      "not_utf8": 1,
    }
    assert dict(s.failed) == {
      "error_code": 1,
      "no_costs": 2,
      "nonpositive_cost": 2,
      "nonfinite_cost": 2,
    }
    _invariant(s)
    assert s.examples[:3] == [
      (path, 2, "blank_line"),
      (path, 3, "invalid_json"),
      (path, 4, "not_an_object"),
    ]
    assert (path, 15, "not_utf8") in s.examples
    np.testing.assert_array_equal(tf.line_numbers, [1, 23])
    assert tf.workload_key == B5DE9
  _assert_same(R.read_task_file(path), R.read_task_file(path, fast=False))


def test_examples_are_bounded(tmp_path):
  path = tmp_path / "many.json"
  with open(_fixture("labels_task.json")) as f:
    first = f.readline()
  path.write_text(first + "{\n" * 100)
  s = R.read_task_file(str(path)).stats
  assert s.malformed == {"invalid_json": 100}
  assert len(s.examples) == R.MAX_EXAMPLES and s.examples[0] == (str(path), 2, "invalid_json")
  assert len((s + s).examples) == R.MAX_EXAMPLES


def test_read_stats_merge_and_serialise():
  a = R.read_task_file(_fixture("bad_lines.json")).stats
  b = R.read_task_file(_fixture("labels_task.json")).stats
  total = a + b
  assert total.files == 2 and total.lines == a.lines + b.lines
  assert total.kept == a.kept + b.kept and total.failed["error_code"] == 2
  assert total.features["records"] == a.kept + b.kept
  _invariant(total)
  assert sum([a, b]).to_dict() == total.to_dict()
  assert R.ReadStats.from_dict(json.loads(json.dumps(total.to_dict()))) == total
  text = total.summary()
  assert "2 files, 28 lines: 6 kept" in text and "workload_mismatch=1" in text
  assert "bad_lines.json:2: blank_line" in text


def test_hardware_name(tmp_path):
  assert R.read_task_file(_fixture("labels_task.json"), hardware="epyc-9004").hardware == (
    "epyc-9004"
  )
  path = tmp_path / "folder-hw" / "task.json"
  path.parent.mkdir()
  with open(_fixture("labels_task.json")) as f:
    path.write_text(f.read().replace(" -model=epyc-9004", ""))
  assert R.read_task_file(str(path)).hardware == "folder-hw"
  assert R.read_task_file(str(path), hardware="given").hardware == "given"
  assert R.hardware_of_target("llvm -mcpu=x -model=a-b_c") == "a-b_c"
  assert R.hardware_of_target("llvm -mcpu=x") is None


def test_empty_and_all_bad_files(tmp_path):
  empty = tmp_path / "empty.json"
  empty.write_bytes(b"")
  tf = R.read_task_file(str(empty))
  assert len(tf) == 0 and tf.workload_key is None and math.isnan(tf.min_cost)
  assert tf.stats.lines == 0 and tf.features.shape[0] == 0
  bad = tmp_path / "bad.json"
  bad.write_bytes(b"\n{\n[]\n")
  tf = R.read_task_file(str(bad), featurizer=F.Featurizer("llvm"))
  assert tf.stats.malformed == {"blank_line": 1, "invalid_json": 1, "not_an_object": 1}
  assert tf.features.shape == (0, 25, 22) and tf.scores.shape == (0,)


def test_unknown_target_without_featurizer_is_counted(tmp_path):
  path = tmp_path / "t.json"
  with open(_fixture("labels_task.json")) as f:
    path.write_text(f.read().replace('"llvm -keys', '"opencl -keys'))
  tf = R.read_task_file(str(path))
  # Not usable without a platform: every well-formed line (the failed one too) is counted.
  assert tf.stats.malformed == {"unknown_target": 5} and not tf.stats.failed
  tf = R.read_task_file(str(path), featurizer=F.Featurizer("llvm"))
  assert len(tf) == 4 and tf.platform == "llvm"


def test_shared_featurizer_grows_once_and_rereads_on_layout_change(tmp_path):
  with open(_fixture("labels_task.json")) as f:
    lines = f.read().splitlines()
  rec = json.loads(lines[2])
  rec["i"][1][1].append(["NEWKIND", 1, "auto_unroll_max_step$1024"])
  lines[2] = json.dumps(rec)
  path = tmp_path / "grow.json"
  path.write_text("\n".join(lines) + "\n")
  fz = F.Featurizer("llvm")
  tf = R.read_task_file(str(path), featurizer=fz)
  assert fz.layout == 12 and tf.layout == 12
  assert tf.stats.features[F.STAT_NEW_KINDS] == 1
  assert tf.stats.features[F.STAT_LAYOUT_CHANGES] == 1
  # Every record of the file is in the new layout, as if the vocabulary had been known.
  ref = F.Featurizer("llvm", vocab=fz.vocab.copy())
  for i, n in enumerate(tf.line_numbers):
    steps = json.loads(lines[n - 1])["i"][1][1]
    np.testing.assert_array_equal(tf.features[i], ref.featurize(steps))
  assert tf.features[0, 0, 11] == 0 and tf.features[0, 0, 12] == 1  # CA 1 2 3: args moved
  fz2 = F.Featurizer("llvm")
  _assert_same(tf, R.read_task_file(str(path), featurizer=fz2, fast=False))
  assert fz2.vocab == fz.vocab


def test_frozen_vocabulary_in_the_reader(tmp_path):
  with open(_fixture("labels_task.json")) as f:
    text = f.read().replace('"CA"', '"ZZ"')
  path = tmp_path / "frozen.json"
  path.write_text(text)
  fz = F.Featurizer("llvm", vocab=F.Vocabulary.original("llvm").freeze())
  tf = R.read_task_file(str(path), featurizer=fz)
  # CA occurs once in each of the 4 kept records (lines 1, 2, 3, 5).
  assert tf.stats.features[F.STAT_UNKNOWN_KINDS] == 4 and fz.layout == 11
  _assert_same(
    tf,
    R.read_task_file(str(path), featurizer=F.Featurizer("llvm", vocab=fz.vocab.copy()), fast=False),
  )


def _sample_files():
  files = sorted(glob.glob(os.path.join(SAMPLE, "*", "*.json")))
  if not files:
    pytest.skip("embedded sample data/sample/tenset-mini is missing")
  return files


def test_fast_path_equals_full_parse_and_original_on_sample_data():
  files = _sample_files()[::3]
  fz = F.Featurizer("llvm")
  total = R.ReadStats()
  for path in files:
    fast = R.read_task_file(path, featurizer=fz)
    _assert_same(fast, R.read_task_file(path, fast=False))
    total += fast.stats
    with open(path) as f:
      lines = f.read().split("\n")
    for i, n in enumerate(fast.line_numbers):
      rec = json.loads(lines[n - 1])
      ref = np.asarray(F.original_tlp_features(rec["i"][1][1], "llvm"), np.float32)
      np.testing.assert_array_equal(fast.features[i], ref)
      assert fast.costs[i] == np.mean(rec["r"][0])
  _invariant(total)
  assert total.kept > 500 and total.fast_path_lines > 0.9 * total.lines


# ---- fuzz: mutated real lines -------------------------------------------------------------


def _real_lines():
  with open(_fixture("labels_task.json"), "rb") as f:
    task = f.read().split(b"\n")[:-1]
  with open(_fixture("real_lines.json"), "rb") as f:
    other = f.read().split(b"\n")[:-1]
  return task, other


_TASK, _OTHER = _real_lines()
_SNIPPETS = [
  b"]",
  b"[",
  b",",
  b", ",
  b'"',
  b"\\",
  b"], [",
  b'], ["',
  b'"r": [[',
  b"]]]",
  b"1",
  b"-0",
  b"1e400",
  b"NaN",
  b"Infinity",
  b"true",
  b"null",
  b"{}",
  b"\xff",
  b"\xed\xa0\x80",
  b"99999999999999999999999",
  b'"CA"',
  b'"XX"',
  b'"auto_unroll_max_step$1024"',
  b" ",
  b"\r",
  b"0.0",
  b"-1e-05",
  b'"v0.5"',
  b"[]",
  b'["SP", 1, [2], ["x"]]',
]


@st.composite
def _mutated_line(draw):
  line = draw(st.sampled_from(_TASK + _OTHER))
  for _ in range(draw(st.integers(0, 3))):
    op = draw(st.sampled_from(["delete", "insert", "replace", "truncate", "swap"]))
    i = draw(st.integers(0, len(line)))
    j = draw(st.integers(i, min(len(line), i + 12)))
    snippet = draw(st.sampled_from(_SNIPPETS))
    if op == "delete":
      line = line[:i] + line[j:]
    elif op == "insert":
      line = line[:i] + snippet + line[i:]
    elif op == "replace":
      line = line[:i] + snippet + line[j:]
    elif op == "truncate":
      line = line[:i]
    else:
      line = line.replace(b'"CA"', b'"AN"', 1).replace(b"0, 3]", b"3, 0]", 1)
  return line


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_mutated_line(), min_size=1, max_size=12), st.booleans(), st.booleans())
def test_fuzz_reader_never_raises_and_fast_equals_full_parse(
  tmp_path_factory, lines, first_ok, no_orjson
):
  if first_ok:
    lines = [_TASK[0]] + lines
  path = tmp_path_factory.mktemp("fuzz") / "task.json"
  path.write_bytes(b"\n".join(lines) + b"\n")
  saved = R._loads_fast, F.json_loads
  if no_orjson:
    R._loads_fast, F.json_loads = F.json_loads_strict, F.json_loads_strict
  try:
    fast = R.read_task_file(str(path), featurizer=F.Featurizer("llvm"))
  finally:
    R._loads_fast, F.json_loads = saved
  full = R.read_task_file(str(path), featurizer=F.Featurizer("llvm"), fast=False)
  _invariant(fast.stats)
  assert fast.stats.lines == len(lines)
  _assert_same(fast, full)
  assert np.isfinite(fast.features).all()
  assert ((fast.scores > 0) & (fast.scores <= 1)).all()


def test_without_orjson_the_reader_gives_the_same_output(monkeypatch):
  paths = [_fixture("bad_lines.json"), _fixture("labels_task.json")]
  want = [R.read_task_file(p, featurizer=F.Featurizer("llvm")) for p in paths]
  monkeypatch.setattr(R, "_loads_fast", F.json_loads_strict)
  monkeypatch.setattr(F, "json_loads", F.json_loads_strict)
  for p, w in zip(paths, want):
    got = R.read_task_file(p, featurizer=F.Featurizer("llvm"))
    _assert_same(got, w)
    assert got.stats.fast_path_lines == w.stats.fast_path_lines > 0


def test_crlf_files_read_like_lf_files(tmp_path):
  with open(_fixture("labels_task.json"), "rb") as f:
    data = f.read()
  path = tmp_path / "crlf.json"
  path.write_bytes(data.replace(b"\n", b"\r\n"))
  crlf = R.read_task_file(str(path))
  _assert_same(crlf, R.read_task_file(_fixture("labels_task.json")))
  assert crlf.stats.fast_path_lines == crlf.stats.lines == 5


# ---- the lower-level API (iter_records, first_record, lines_at) --------------------------------


@pytest.mark.parametrize("name", ["bad_lines.json", "labels_task.json", "real_lines.json"])
def test_iter_records_has_the_reader_labels_and_counts(name):
  path = _fixture(name)
  want = R.read_task_file(path, featurizer=F.Featurizer("llvm"))
  stats = R.ReadStats()
  recs = list(R.iter_records(path, stats))
  valid = [r for r in recs if r.failure is None]
  assert [r.line_number for r in valid] == want.line_numbers.tolist()
  # The same labels, bit for bit, and the same join keys.
  assert R.mean_costs([r.costs for r in valid]).tobytes() == want.costs.tobytes()
  assert [r.program_key for r in valid] == want.program_keys.tolist()
  _invariant(stats)
  got, ref = stats.to_dict(), want.stats.to_dict()
  for key in ("files", "lines", "kept", "failed", "malformed", "examples"):
    assert got[key] == ref[key], key
  assert sum(r.failure is not None for r in recs) == stats.num_failed
  lines = R.read_lines(path)
  assert all(lines[r.line_number - 1] == r.line for r in recs)
  assert all(r.workload_key == want.workload_key and r.target == want.target for r in recs)


def test_first_record_skips_bad_lines(tmp_path):
  path = tmp_path / "task.json"
  good = R.read_lines(_fixture("labels_task.json"))[0]
  path.write_bytes(b"\n" + b"not json\n" + b'{"v": "v0.6"}\r\n' + good + b"\r\n")
  first = R.first_record(str(path))
  assert first.line_number == 4 and first.line == good
  assert first == next(R.iter_records(str(path)))
  empty = tmp_path / "empty.json"
  empty.write_bytes(b"\n\n")
  assert R.first_record(str(empty)) is None


def test_lines_at(tmp_path):
  path = tmp_path / "crlf.json"
  path.write_bytes(b"a\r\nb\nc")
  assert R.lines_at(str(path), [3, 1]) == [b"c", b"a"]
  with pytest.raises(IndexError, match="line 4 beyond"):
    R.lines_at(str(path), [4])
  with pytest.raises(IndexError, match="line 0 beyond"):
    R.lines_at(str(path), [0])


def _with_costs(tmp_path, costs_by_line):
  """labels_task.json with the costs of some (1-based) lines replaced."""
  with open(_fixture("labels_task.json")) as f:
    recs = [json.loads(line) for line in f]
  for lineno, costs in costs_by_line.items():
    recs[lineno - 1]["r"][0] = costs
  path = tmp_path / "costs.json"
  path.write_text("".join(json.dumps(r) + "\n" for r in recs))
  return str(path)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("cost", [1e-320, 5e-324, 1e-39, 1e39, 1e300])
def test_cost_outside_float32_is_a_counted_failure_not_a_label(tmp_path, fast, cost):
  # A 1e-320 s minimum made every other score of the task underflow to 0 in the dataset's
  # float32 (the build then dropped those records silently).
  path = _with_costs(tmp_path, {2: [cost]})
  tf = R.read_task_file(path, fast=fast)
  assert tf.stats.failed == {"error_code": 1, "cost_out_of_range": 1}
  assert tf.stats.kept == 3 and len(tf) == 3
  _invariant(tf.stats)
  np.testing.assert_array_equal(tf.line_numbers, [1, 3, 5])
  np.testing.assert_allclose(tf.scores, [5e-6 / 3e-5, 0.25, 1.0], rtol=1e-12)
  assert (tf.scores.astype(np.float32) > 0).all()
  assert [r.failure for r in R.iter_records(path)][1] == "cost_out_of_range"


def test_costs_at_the_edges_of_float32_are_kept(tmp_path):
  tiny, big = float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max)
  tf = R.read_task_file(_with_costs(tmp_path, {2: [tiny], 3: [big]}))
  assert tf.stats.kept == 4 and not tf.stats.failed.get("cost_out_of_range")


@pytest.mark.parametrize("fast", [True, False])
def test_records_of_another_hardware_are_counted_not_labelled(tmp_path, fast):
  # The folder says xeon-emr-16c, the target says epyc-9004: not this hardware's timings.
  path = tmp_path / "xeon-emr-16c" / "t.json"
  path.parent.mkdir()
  with open(_fixture("labels_task.json")) as f:
    path.write_text(f.read())
  tf = R.read_task_file(str(path), hardware="xeon-emr-16c", fast=fast)
  assert len(tf) == 0 and tf.stats.malformed == {"other_hardware": 5}
  assert tf.stats.kept == 0 and not tf.stats.failed
  _invariant(tf.stats)
  assert tf.stats.examples[0] == (str(path), 1, "other_hardware")
  # Read as the hardware its target names, or with no hardware given, it is labelled.
  assert len(R.read_task_file(str(path), hardware="epyc-9004", fast=fast)) == 4
  assert len(R.read_task_file(str(path), fast=fast)) == 4
  # A target without -model= cannot name another hardware.
  path.write_text(path.read_text().replace(" -model=epyc-9004", ""))
  assert len(R.read_task_file(str(path), hardware="xeon-emr-16c", fast=fast)) == 4
