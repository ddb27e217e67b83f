"""The build CLI: user errors are one line (exit 1), a build prints no TFDS download banner."""

import pytest


def _user_error_cases(tmp_path, sample):
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  data = str(tmp_path / "data")
  return {
    "no_tenset_dir": (["--data_dir", data], "flag --tenset_dir=None"),
    "missing_tenset_dir": (
      ["--tenset_dir", str(tmp_path / "nope"), "--data_dir", data],
      "no measure_records folder",
    ),
    "bad_crop": (["--tenset_dir", sample, "--data_dir", data, "--crop", "25"], "--crop must be"),
    "bad_enum": (
      ["--tenset_dir", sample, "--data_dir", data, "--validation", "x"],
      "flag --validation=x",
    ),
    "workers_0": (["--tenset_dir", sample, "--data_dir", data, "--workers", "0"], "--workers=0"),
    "extra_argument": (["--tenset_dir", sample, "--data_dir", data, "extra"], "unexpected"),
    "data_dir_is_a_file": (
      ["--tenset_dir", sample, "--data_dir", str(a_file)],
      "is not a directory",
    ),
  }


@pytest.mark.parametrize(
  "case",
  [
    "no_tenset_dir",
    "missing_tenset_dir",
    "bad_crop",
    "bad_enum",
    "workers_0",
    "extra_argument",
    "data_dir_is_a_file",
  ],
)
def test_user_errors_are_one_line(tmp_path, sample_tenset_dir, case, run_python):
  args, message = _user_error_cases(tmp_path, sample_tenset_dir)[case]
  proc = run_python("-m", "data_pipelines.build", *args)
  assert proc.returncode == 1
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr[-3000:]
  assert lines[0].startswith("error: ") and message in lines[0]
  assert not proc.stdout


def test_build_prints_no_download_banner(tmp_path, sample_tenset_dir, run_python):
  proc = run_python(
    "-m",
    "data_pipelines.build",
    "--tenset_dir",
    sample_tenset_dir,
    "--data_dir",
    str(tmp_path / "data"),
    "--hardware",
    "xeon-emr-16c",
    "--nomulti",
    "--loop_tokens",
    "off",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout + proc.stderr
  # Nothing is downloaded; TFDS's banners also named the staging folder, not the data dir.
  assert "Downloading and preparing" not in out and "downloaded and prepared" not in out
  assert "Using custom data configuration" not in out
  assert proc.stdout.splitlines()[0].startswith("config xeon-emr-16c:")
  assert "built 1 configs (xeon-emr-16c)" in proc.stdout
