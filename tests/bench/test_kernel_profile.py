"""bench.kernel_profile: a real trace is read back and summed per line and event name."""

import jax
import jax.numpy as jnp

from bench import kernel_profile


def test_trace_is_summed_per_line_and_name(tmp_path):
  f = jax.jit(lambda x: jnp.tanh(x @ x).sum())
  x = jnp.ones((128, 128))
  f(x).block_until_ready()
  xplane = kernel_profile.trace(lambda: [f(x).block_until_ready() for _ in range(4)], tmp_path)
  # No accelerator here: the host plane holds the work (on a GPU, "/device:GPU:0").
  assert kernel_profile.summarize(xplane, calls=4, plane_prefix="/device:") == {}
  host = kernel_profile.summarize(xplane, top=3, calls=4, plane_prefix="/host:CPU")
  lines = host["/host:CPU"]
  assert lines, "the host plane has no events"
  for line in lines.values():
    top = line["top"]
    assert 1 <= len(top) <= 3
    assert [e["ms_per_call"] for e in top] == sorted((e["ms_per_call"] for e in top), reverse=True)
    assert sum(e["ms_per_call"] for e in top) <= line["total_ms_per_call"] + 1e-9
    assert all(e["count_per_call"] > 0 for e in top)
    # Every event is in exactly one family: their totals add up to the line's.
    fams = line["families"]
    assert abs(sum(f["ms_per_call"] for f in fams.values()) - line["total_ms_per_call"]) < 1e-6
    assert abs(sum(f["kernels_per_call"] for f in fams.values()) - line["launches_per_call"]) < 1e-9


def test_kernel_families():
  fam = kernel_profile.family
  assert fam("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "gemm"
  assert fam("nvjet_sm90_tst_128x64_64x4_2x1_v_bz_coopB_TNT") == "gemm"
  assert fam("cudnn_generated_fort_native_sdpa_sm90_flash_bprop") == "attention"
  assert fam("input_reduce_select_fusion_4") == "reduce"
  assert fam("loop_transpose_fusion_4") == "transpose_copy"
  assert fam("loop_gather_fusion") == "gather_scatter"
  assert fam("loop_add_fusion_30") == "elementwise"
