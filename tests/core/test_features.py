"""Tests of the TLP featurizer: hand-derived vectors, crops, vocabulary, cached paths."""

import hashlib
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tlp_jax.core import features as F

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "records")


def _real_steps():
  with open(os.path.join(FIXTURES, "real_lines.json")) as f:
    return [json.loads(line)["i"][1][1] for line in f]


def _expected(rows, shape):
  """Matrix of ``shape`` with the given rows (lists, zero-padded) on top, zeros below."""
  out = np.zeros(shape, np.float32)
  for i, r in enumerate(rows):
    out[i, : len(r)] = r
  return out


def _oh(pos, width=11):
  v = [0] * width
  v[pos] = 1
  return v


# llvm one-hot positions: CI 0, RE 1, AN 2, RF 3, CHW 4, SP 5, CR 6, CA 7, FU 8, FSP 9, PR 10.
# llvm unroll ids: 16 -> 1, 0 -> 2, 512 -> 3, 64 -> 4.


def test_real_record_with_sp_and_pr():
  steps = _real_steps()[0]
  assert steps[0] == ["SP", 1, 2, 512, [64], 1]
  want = _expected(
    [
      _oh(5) + [1, 2, 512, 64, 1],  # SP
      _oh(3) + [1, 2, 2],  # RF
      _oh(6) + [3],  # CR
      _oh(7) + [2, 3, 1],  # CA
      _oh(7) + [1, 3, 0],  # CA
      _oh(2) + [3, 0, 3],  # AN
      _oh(10) + [1, 0, 1],  # PR auto_unroll_max_step$16
      _oh(10) + [2, 0, 2],  # PR auto_unroll_max_step$0
    ],
    (25, 22),
  )
  np.testing.assert_array_equal(F.featurize(steps), want)


def test_real_record_without_chw():
  steps = _real_steps()[1]
  assert steps == [["CA", 1, 2, 0], ["AN", 2, 0, 3], ["PR", 1, 0, "auto_unroll_max_step$16"]]
  want = _expected([_oh(7) + [1, 2, 0], _oh(2) + [2, 0, 3], _oh(10) + [1, 0, 1]], (25, 22))
  out = F.featurize(steps, platform="llvm")
  assert out.dtype == np.float32 and out.shape == (25, 22)
  np.testing.assert_array_equal(out, want)


def test_real_record_with_chw_and_a_step_cropped_to_22():
  steps = _real_steps()[2]
  assert steps[0] == ["CHW", 2, "local"] and steps[5][0] == "RE"
  out = F.featurize(steps)
  np.testing.assert_array_equal(out[0], _expected([_oh(4) + [2, 1]], (1, 22))[0])
  # RE 2 [0, 4, 8, 1, 5, 9, 12, 2, 6, 10, 13, 3, 7, 11]: 26 values, the crop keeps 22.
  np.testing.assert_array_equal(out[5], _oh(1) + [2, 0, 4, 8, 1, 5, 9, 12, 2, 6, 10])
  np.testing.assert_array_equal(out[13], _expected([_oh(10) + [2, 0, 1]], (1, 22))[0])
  assert not out[14:].any()


def test_handwritten_cuda_record():
  # cuda one-hot: AN 0, CHR 1, CHW 2, CI 3, CA 4, FFSP 5, SP 6, FU 7, RE 8, PR 9, FSP 10;
  # unroll 0 -> 1, 16 -> 2, 64 -> 3, 1024 -> 4, 512 -> 5; CHW local 1, shared 2, global 3.
  steps = [
    ["CHR", 2, "shared", [3]],
    ["CHW", 3, "local"],
    ["FFSP", 4, 2, [1, 2], 1],
    ["PR", 4, 0, "auto_unroll_max_step$1024"],
    ["SP", 4, 0, 64, [2, 4], 1],
    ["CHW", 5, "global"],
    ["RE", 4, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]],
  ]
  want = _expected(
    [
      _oh(1) + [2, 1, 3],
      _oh(2) + [3, 1],
      _oh(5) + [4, 2, 1, 2, 1],
      _oh(9) + [4, 0, 4],
      _oh(6) + [4, 0, 64, 2, 4, 1],
      _oh(2) + [5, 3],
      _oh(8) + [4, 0, 1, 2, 3, 4, 5, 6, 7],
    ],
    (40, 20),
  )  # crop 20 drops 8, 9
  out = F.featurize(steps, platform="cuda")
  assert out.shape == (40, 20)
  np.testing.assert_array_equal(out, want)


def test_matches_original_loop_on_real_lines():
  for steps in _real_steps():
    for crop in [None, (25, 22), (54, 40), (10, 5)]:
      ref = np.asarray(F.original_tlp_features(steps, "llvm", crop), np.float32)
      np.testing.assert_array_equal(F.featurize(steps, crop=crop), ref)


def test_crop_larger_than_full_pads_with_zeros():
  steps = _real_steps()[2]
  big = F.featurize(steps, crop=(60, 45))
  full = F.featurize(steps, crop=F.FULL_SHAPE["llvm"])
  assert big.shape == (60, 45)
  np.testing.assert_array_equal(big[:54, :40], full)
  assert not big[54:].any() and not big[:, 40:].any()


def test_over_wide_steps_and_over_long_records_are_cropped_and_counted():
  wide = ["RE", 1, list(range(40))]  # 11 + 41 values > 40
  steps = [wide] + [["CR", i] for i in range(60)]  # 61 steps > 54
  stats = {}
  out = F.featurize(steps, crop=(70, 45), stats=stats)
  assert stats[F.STAT_STEPS_OVER_WIDTH] == 1
  assert stats[F.STAT_RECORDS_OVER_LENGTH] == 1
  np.testing.assert_array_equal(out[0, :40], _oh(1) + [1] + list(range(28)))
  assert not out[0, 40:].any()
  np.testing.assert_array_equal(out[53, :13], _oh(6) + [52, 0])  # step 54 is the last kept
  assert not out[54:].any()


def test_bools_floats_and_unsupported_values_never_crash():
  stats = {}
  out = F.featurize([["AN", True, 2.5, None, [1, 2.0]]], stats=stats)
  np.testing.assert_array_equal(out[0, :16], _oh(2) + [1, 2.5, 0, 1, 2.0])
  assert stats[F.STAT_FLOAT_VALUES] == 2
  assert stats[F.STAT_UNSUPPORTED_VALUES] == 1
  assert F.STAT_IRREGULAR_LIST_ITEMS not in stats  # a float in a list counts as a float
  out = F.featurize([["AN", 1e300, -(10**400)]], stats=stats)
  assert stats[F.STAT_OUT_OF_RANGE_VALUES] == 2
  assert np.isfinite(out).all()


def test_growing_vocabulary_appends_new_entries():
  vocab = F.Vocabulary.original("llvm")
  stats = {}
  steps = [
    ["PR", 1, 0, "auto_unroll_max_step$1024"],
    ["CHW", 1, "texture"],
    ["CA", 1, "odd"],
    ["PR", 1, 0, "auto_unroll_max_step$1024"],
    ["PR", 2, 0, "debug_skip_region"],
  ]
  out = F.featurize(steps, vocab=vocab, stats=stats)
  assert vocab.tokens["unroll"]["auto_unroll_max_step$1024"] == 5  # after the table's max 4
  assert vocab.tokens["CHW"]["texture"] == 4
  assert vocab.tokens["CA"] == {"odd": 1}
  assert vocab.tokens["PR"] == {"debug_skip_region": 1}
  assert stats[F.STAT_NEW_TOKENS] == 4
  np.testing.assert_array_equal(out[0, 11:14], [1, 0, 5])
  np.testing.assert_array_equal(out[1, 11:13], [1, 4])
  np.testing.assert_array_equal(out[2, 11:13], [1, 1])
  np.testing.assert_array_equal(out[4, 11:14], [2, 0, 1])
  # Original entries keep their ids: a TenSet record is unchanged under the grown vocabulary.
  for steps in _real_steps():
    np.testing.assert_array_equal(F.featurize(steps, vocab=vocab), F.featurize(steps))


def test_new_step_kind_widens_the_one_hot_block():
  vocab = F.Vocabulary.original("cuda")
  featurizer = F.Featurizer("cuda", crop=(40, 20), vocab=vocab)
  before = featurizer.featurize([["CA", 1, 2, 0]])
  assert featurizer.layout == 11
  # "RF" is not in the cuda table: it becomes kind 12 and every vector gets 12 one-hot columns.
  out = featurizer.featurize([["CA", 1, 2, 0], ["RF", 1, 2, 2]])
  assert vocab.kinds[-1] == "RF" and vocab.one_hot_width == 12 and featurizer.layout == 12
  np.testing.assert_array_equal(out[0, :15], _oh(4, 12) + [1, 2, 0])  # shifted by one
  np.testing.assert_array_equal(out[1, :15], _oh(11, 12) + [1, 2, 2])
  assert not np.array_equal(before[0], out[0])
  assert featurizer.stats[F.STAT_NEW_KINDS] == 1
  assert featurizer.stats[F.STAT_LAYOUT_CHANGES] == 1


def test_featurize_many_redoes_a_batch_when_the_layout_changes():
  batch = [[["CA", 1, 2, 0]], [["XX", 3]], [["AN", 1, 0, 3]]]
  fz = F.Featurizer("llvm")
  out = fz.featurize_many(batch)
  ref = F.Featurizer("llvm", vocab=fz.vocab.copy())
  np.testing.assert_array_equal(out, np.stack([ref.featurize(s) for s in batch]))
  assert out[0, 0, 12:15].tolist() == [1, 2, 0]  # 12 one-hot columns in the first record too
  assert fz.stats[F.STAT_NEW_KINDS] == 1 and fz.stats[F.STAT_RECORDS] == 3


def test_frozen_vocabulary_maps_unknowns_to_zero_counts_and_logs_once(caplog):
  vocab = F.Vocabulary.original("llvm").freeze()
  before = vocab.to_json()
  stats = {}
  steps = [
    ["XX", 1, 2],
    ["PR", 1, 0, "auto_unroll_max_step$1024"],
    ["XX", 3],
    ["CHW", 1, "texture"],
  ]
  with caplog.at_level(logging.WARNING):
    out = F.featurize(steps, vocab=vocab, stats=stats)
  assert vocab.to_json() == before
  assert stats[F.STAT_UNKNOWN_KINDS] == 2 and stats[F.STAT_UNKNOWN_TOKENS] == 2
  np.testing.assert_array_equal(out[0, :13], [0] * 11 + [1, 2])  # no one-hot bit, not dropped
  np.testing.assert_array_equal(out[1, :14], _oh(10) + [1, 0, 0])
  np.testing.assert_array_equal(out[2, :12], [0] * 11 + [3])
  assert sum("'XX'" in r.getMessage() for r in caplog.records) == 1


def test_vocabulary_json_round_trip_and_validation():
  vocab = F.Vocabulary.original("cuda")
  F.featurize([["RF", 1, 2, 2], ["PR", 1, 0, "auto_unroll_max_step$8"]], "cuda", vocab=vocab)
  text = vocab.to_json()
  data = json.loads(text)
  assert data["version"] == F.VOCAB_VERSION and data["platform"] == "cuda"
  assert data["kinds"][:11] == list(F.ORIGINAL_KINDS["cuda"]) and data["kinds"][11] == "RF"
  again = F.Vocabulary.from_json(text)
  assert again == vocab and not again.frozen
  assert F.Vocabulary.from_json(text, frozen=True).frozen
  with pytest.raises(ValueError, match="version"):
    F.Vocabulary.from_json(json.dumps(dict(data, version=99)))
  with pytest.raises(ValueError, match="platform"):
    F.Vocabulary.from_json(json.dumps(dict(data, platform="tpu")))
  with pytest.raises(ValueError, match="parse"):
    F.Vocabulary.from_json("{")
  with pytest.raises(ValueError, match="distinct"):
    F.Vocabulary.from_json(json.dumps(dict(data, tokens={"CHW": {"a": 1, "b": 1}})))
  with pytest.raises(ValueError):
    F.Featurizer("llvm", vocab=vocab)


def test_original_tables():
  v = F.Vocabulary.original("llvm")
  assert v.kinds == ["CI", "RE", "AN", "RF", "CHW", "SP", "CR", "CA", "FU", "FSP", "PR"]
  assert v.tokens["unroll"] == {
    "auto_unroll_max_step$16": 1,
    "auto_unroll_max_step$0": 2,
    "auto_unroll_max_step$512": 3,
    "auto_unroll_max_step$64": 4,
  }
  c = F.Vocabulary.original("cuda")
  assert c.kinds == ["AN", "CHR", "CHW", "CI", "CA", "FFSP", "SP", "FU", "RE", "PR", "FSP"]
  assert c.tokens["unroll"]["auto_unroll_max_step$1024"] == 4
  assert F.FULL_SHAPE == {"llvm": (54, 40), "cuda": (69, 49)}
  assert F.DEFAULT_CROP == {"llvm": (25, 22), "cuda": (40, 20)}


def test_platform_of_target():
  assert F.platform_of_target("llvm -keys=cpu -mcpu=znver4 -model=epyc-9004") == "llvm"
  assert F.platform_of_target("cuda -keys=cuda,gpu -arch=sm_86 -model=a100") == "cuda"
  assert F.platform_of_target('{"kind": "cuda", "arch": "sm_80"}') == "cuda"
  with pytest.raises(ValueError, match="opencl"):
    F.platform_of_target("opencl -device=mali")
  with pytest.raises(ValueError):
    F.Featurizer("tpu")
  with pytest.raises(ValueError):
    F.Featurizer("llvm", crop=(0, 22))


def test_program_key_is_stable_and_format_independent():
  steps = _real_steps()[1]
  canon = F.canonical_steps_json(steps)
  assert canon == json.dumps(steps).encode()
  assert F.canonical_steps_json(json.loads(json.dumps(steps, indent=1))) == canon
  key = F.program_key(canon)
  # The documented definition, computed independently: BLAKE2b-64 of json.dumps, little-endian.
  want = int.from_bytes(
    hashlib.blake2b(json.dumps(steps).encode(), digest_size=8).digest(), "little"
  )
  assert key == want and 0 <= key < 2**64
  assert key != F.program_key(F.canonical_steps_json(_real_steps()[0]))


def test_import_needs_no_jax():
  code = (
    "import sys; import tlp_jax.core.features; "
    "assert 'jax' not in sys.modules and 'flax' not in sys.modules, sorted(sys.modules)"
  )
  subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# ---- cached paths equal the reference path ------------------------------------------------

_ints = st.integers(min_value=-(2**70), max_value=2**70)
_small = st.integers(min_value=0, max_value=600)
_strings = st.sampled_from(
  [
    "auto_unroll_max_step$16",
    "auto_unroll_max_step$0",
    "auto_unroll_max_step$7",
    "local",
    "shared",
    "global",
    "texture",
    "a, b",
    "é",
    'q"x',
    "debug",
  ]
)
_kinds = st.sampled_from(list(F.ORIGINAL_KINDS["llvm"]) + ["CHR", "FFSP", "NEW"])
_field = st.one_of(
  _small,
  _small,
  _ints,
  _strings,
  st.booleans(),
  st.floats(allow_nan=True, allow_infinity=True),
  st.none(),
  st.lists(st.one_of(_small, _small, _ints, _strings, st.floats()), max_size=8),
)
_step = st.builds(lambda k, fs: [k] + fs, _kinds, st.lists(_field, max_size=12))
_record = st.lists(_step, max_size=58)


@settings(max_examples=100, deadline=None)
@given(st.lists(_record, min_size=1, max_size=5), st.booleans())
def test_cached_and_text_paths_equal_the_reference(records, frozen):
  vocab = F.Vocabulary.original("llvm").freeze() if frozen else F.Vocabulary.original("llvm")
  ref_fz = F.Featurizer("llvm", vocab=vocab.copy())
  ref = np.stack([ref_fz.featurize(s) for s in records])
  # Reference again with the settled vocabulary (a new kind changes earlier records' layout).
  final = F.Featurizer("llvm", vocab=ref_fz.vocab.copy())
  ref = np.stack([final.featurize(s) for s in records])

  many_fz = F.Featurizer("llvm", vocab=vocab.copy())
  many = many_fz.featurize_many(records)
  np.testing.assert_array_equal(many, ref)
  assert many_fz.vocab == ref_fz.vocab

  text_fz = F.Featurizer("llvm", vocab=vocab.copy())
  outs = []
  for _ in range(2):  # twice: the second pass is served from the cache
    outs = []
    for steps in records:
      text = json.dumps(steps, ensure_ascii=False).encode("utf-8", "surrogatepass")[1:-1]
      got = text_fz.featurize_step_texts(text, text_fz.stats)
      # Only a step holding '], ["' itself makes the split ambiguous; the reader then
      # parses the whole line.
      ambiguous = any(b'], ["' in json.dumps(s).encode()[1:-1] for s in steps)
      assert (got is None) == ambiguous, text
      if got is None:
        got = (text_fz.featurize_to_bytes(steps, text_fz.stats), F.canonical_steps_json(steps))
      outs.append(got)
  assert text_fz.vocab == ref_fz.vocab
  text_feats = np.stack([np.frombuffer(o[0], np.float32).reshape(25, 22) for o in outs])
  np.testing.assert_array_equal(text_feats, ref)
  for (_, canon), steps in zip(outs, records):
    assert canon == F.canonical_steps_json(steps)


@pytest.mark.parametrize("frozen", [False, True])
def test_featurize_many_texts_equals_featurize_many(frozen):
  records = _real_steps() * 2 + [[["AN", 1.5]], [], [["NEW", 1, [2, "x"]], ["SP", 1, 0, 8, [2], 1]]]
  vocab = F.Vocabulary.original("llvm").freeze() if frozen else F.Vocabulary.original("llvm")
  a, b = F.Featurizer("llvm", vocab=vocab.copy()), F.Featurizer("llvm", vocab=vocab.copy())
  texts = [json.dumps(s).encode()[1:-1] for s in records]
  texts[0] = json.dumps(records[0], separators=(",", ":")).encode()[1:-1]  # not TVM's layout
  for _ in range(2):  # the second pass is served from the text cache
    want, got = a.featurize_many(records), b.featurize_many_texts(texts)
    np.testing.assert_array_equal(got, want)
  assert a.stats == b.stats and a.vocab == b.vocab
  with pytest.raises(ValueError, match="not a list of steps"):
    b.featurize_many_texts([b'["CA", 1'])
  with pytest.raises(ValueError, match="not a list of steps"):  # strict UTF-8
    b.featurize_many_texts([b'["C\xffA", 1], ["AN", 1,2]'])


def test_featurize_many_texts_counts_one_layout_change_per_redone_batch():
  # Three new kinds in one batch widen the one-hot block three times on the text path; the batch
  # is redone once, and counted once, as featurize_many counts it.
  records = [[["NEWA", 1]], [["NEWB", 2]], [["CA", 1, 2, 0], ["NEWC", 3]]]
  a, b = F.Featurizer("llvm"), F.Featurizer("llvm")
  want = a.featurize_many(records)
  got = b.featurize_many_texts([json.dumps(s).encode()[1:-1] for s in records])
  np.testing.assert_array_equal(got, want)
  assert a.stats == b.stats and a.stats[F.STAT_LAYOUT_CHANGES] == 1 and a.vocab == b.vocab


def test_featurize_many_counts_like_featurize():
  records = _real_steps() * 3 + [[["AN", 1.5]]] * 2
  a, b = F.Featurizer("llvm"), F.Featurizer("llvm")
  np.testing.assert_array_equal(
    a.featurize_many(records), np.stack([b.featurize(s) for s in records])
  )
  assert a.stats == b.stats and a.stats[F.STAT_FLOAT_VALUES] == 2


def test_step_texts_go_back_to_the_caller_unless_the_split_is_proven():
  fz = F.Featurizer("llvm")
  # Malformed texts, and one valid step ('["CA", [1], ["x"]]') whose split is ambiguous:
  # all go back (None) to the full parse, and nothing is counted or added meanwhile.
  for bad in [
    b'["CA", 1]], ["AN"',
    b'["CA", [1], ["x"]]',
    b'["CA", 1',
    b'"CA", 1]',
    b'["CA", 1], 2]',
    b'["CA", 1]]',
    b'["C\xffA", 1]',
    b'["CA", 1], ["NEW", 2], [',
  ]:
    assert fz.featurize_step_texts(bad, fz.stats) is None, bad
    assert not fz.step_texts_valid(bad), bad
  assert not fz.stats and fz.vocab == F.Vocabulary.original("llvm")
  out = fz.featurize_step_texts(b'["CA", 1], ["AN", [1, "x"]]', fz.stats)
  assert out is not None and out[1] == b'[["CA", 1], ["AN", [1, "x"]]]'
  assert fz.stats[F.STAT_IRREGULAR_LIST_ITEMS] == 1 and fz.vocab.tokens["AN"] == {"x": 1}


def test_featurizers_sharing_a_vocabulary_follow_its_layout():
  vocab = F.Vocabulary.original("llvm")
  a, b = F.Featurizer("llvm", vocab=vocab), F.Featurizer("llvm", vocab=vocab)
  text = b'["CA", 1, 2, 0]'
  first = a.featurize_step_texts(text, a.stats)[0]
  assert a.featurize_many([[["CA", 1, 2, 0]]])[0, 0, 11] == 1
  b.featurize([["NEWKIND", 1]])  # grows the shared vocabulary: 12 one-hot columns
  again = a.featurize_step_texts(text, a.stats)[0]
  assert first != again
  assert np.frombuffer(again, np.float32)[12] == 1
  assert a.featurize_many([[["CA", 1, 2, 0]]])[0, 0, 12] == 1
  np.testing.assert_array_equal(
    np.frombuffer(a.featurize_to_bytes([["CA", 1, 2, 0]]), np.float32).reshape(25, 22),
    b.featurize([["CA", 1, 2, 0]]),
  )
  assert a.stats[F.STAT_LAYOUT_CHANGES] == 1
