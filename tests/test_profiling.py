"""`config.profile`: a tiny training run writes a JAX profiler trace into its stage directory, and a
bad profile field is refused before anything trains."""
import glob
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T2I = os.path.join(ROOT, "configs", "t2i_pretrain.py")


def _train(workdir, *overrides):
    cmd = [sys.executable, "-m", "uniimage_jax.cli.train", f"--config={T2I}:tiny",
           f"--workdir={workdir}", "--config.checkpoint.async_save=False", *overrides]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_profile_writes_a_trace_into_the_stage_dir(tmp_path):
    w = str(tmp_path / "w")
    out = _train(w, "--config.max_steps=3", "--config.profile.start_step=1",
                 "--config.profile.num_steps=1")
    assert out.returncode == 0, out.stderr[-3000:]
    traces = glob.glob(os.path.join(w, "t2i_pretrain", "profile", "plugins", "profile", "*",
                                    "*.xplane.pb"))
    assert len(traces) == 1, os.listdir(os.path.join(w, "t2i_pretrain"))
    assert os.path.getsize(traces[0]) > 1000


def test_a_bad_profile_field_is_refused_before_training(tmp_path):
    w = str(tmp_path / "w")
    out = _train(w, "--config.max_steps=1", "--config.profile.num_steps=-1")
    assert out.returncode != 0
    assert "config.profile.num_steps must be an int >= 0" in out.stderr
    assert not os.path.exists(os.path.join(w, "t2i_pretrain", "profile"))
