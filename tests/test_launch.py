"""Launch recipes: --dry-run prints the exact commands (parsed back with shlex), runs nothing;
missing settings fail naming them; every script is shellcheck-clean."""
import os
import shlex
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parents[1] / "launch"
SCRIPTS = sorted(p for p in [*LAUNCH.glob("*.sh"), *LAUNCH.glob("*.sbatch"), *LAUNCH.glob("xpk/*.sh")]
                 if p.name != "lib.sh")  # lib.sh is sourced by the others
TPU = ["--tpu-name", "pod1", "--zone", "us-east5-a"]
FAKE_TOOLS = ("gcloud", "xpk", "sbatch", "srun", "scontrol", "git", "uniimage-train")


@pytest.fixture
def fake_bin(tmp_path):
    """PATH with recording stand-ins for every external tool: a dry run must call none of them."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.log"
    for tool in FAKE_TOOLS:
        script = bin_dir / tool
        script.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "{tool} $*" >> {calls}\n')
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return bin_dir, calls


def launch(script, *args, fake_bin=None, stdin=subprocess.DEVNULL):
    env = dict(os.environ)
    env.pop("UNIIMAGE_TRAIN", None)
    if fake_bin is not None:
        env["PATH"] = f"{fake_bin[0]}:{env['PATH']}"
    return subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True,
                          env=env, stdin=stdin, timeout=60)


def commands(result):
    """The printed commands ('+ ...' lines) as argv lists."""
    assert result.returncode == 0, result.stderr
    return [shlex.split(line[2:]) for line in result.stdout.splitlines() if line.startswith("+ ")]


def dry_run(script, *args, fake_bin):
    result = launch(script, "--dry-run", *args, fake_bin=fake_bin)
    cmds = commands(result)
    assert cmds, result.stdout
    assert not fake_bin[1].exists(), f"--dry-run ran {fake_bin[1].read_text()}"
    return cmds


def option(argv, name):
    values = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
    assert len(values) == 1, f"{name} in {argv}"
    return values[0]


# ---------------------------------------------------------------------------------- shellcheck
def test_shellcheck_clean():
    assert len(SCRIPTS) >= 10, SCRIPTS
    exe = shutil.which("shellcheck")
    assert exe, "shellcheck is not installed (apt-get install -y shellcheck); the launch scripts must be checked"
    result = subprocess.run([exe, "-x", "--severity=style", str(LAUNCH / "lib.sh"),
                             *map(str, SCRIPTS)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", [s.relative_to(LAUNCH).as_posix() for s in SCRIPTS])
def test_help_and_strict_mode(script):
    text = (LAUNCH / script).read_text()
    assert "set -euo pipefail" in text
    result = launch(script, "--help")
    assert result.returncode == 0 and "Usage" in result.stdout, result.stderr
    assert "--dry-run" in result.stdout
    bad = launch(script, "--no-such-flag")
    assert bad.returncode != 0 and "--no-such-flag" in bad.stderr


def test_readme_covers_every_script():
    readme = (LAUNCH / "README.md").read_text()
    for script in SCRIPTS:
        assert script.name in readme, script.name
    for needle in ("v5p-64", "H100", "init_from", "preempt", "t2i_pretrain", "ti2i_pretrain",
                   "finetune", "TensorBoard"):
        assert needle in readme, needle


# ---------------------------------------------------------------------------------- Cloud TPU
def test_tpu_create(fake_bin):
    (cmd,) = dry_run("tpu_create.sh", *TPU, "--project", "proj", "--spot", fake_bin=fake_bin)
    assert cmd[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "pod1"]
    assert option(cmd, "--node-id") == "pod1"
    assert option(cmd, "--zone") == "us-east5-a"
    assert option(cmd, "--project") == "proj"
    assert option(cmd, "--accelerator-type") == "v5p-64"
    assert option(cmd, "--runtime-version") == "v2-alpha-tpuv5"
    assert "--spot" in cmd and "--reserved" not in cmd

    (cmd,) = dry_run("tpu_create.sh", *TPU, "--accelerator-type", "v6e-256", "--reserved",
                     fake_bin=fake_bin)
    assert option(cmd, "--runtime-version") == "v2-alpha-tpuv6e"
    assert "--reserved" in cmd and "--spot" not in cmd
    assert not any(a.startswith("--project") for a in cmd)

    both = launch("tpu_create.sh", *TPU, "--spot", "--reserved", "--dry-run")
    assert both.returncode != 0 and "--spot" in both.stderr


def test_tpu_create_runs_the_printed_command(fake_bin):
    result = launch("tpu_create.sh", *TPU, fake_bin=fake_bin)
    (printed,) = commands(result)
    ran = fake_bin[1].read_text().split()
    assert ran == printed


def test_tpu_setup_installs_on_all_workers(fake_bin):
    archive, scp, ssh = dry_run("tpu_setup.sh", *TPU, fake_bin=fake_bin)
    assert archive[:2] == ["git", "-C"] and "archive" in archive and archive[-1] == "HEAD"
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod1"]
    for cmd in (scp, ssh):
        assert "--worker=all" in cmd
        assert option(cmd, "--zone") == "us-east5-a"
    remote = option(ssh, "--command")
    assert "pip install -q -U 'jax[tpu]'" in remote
    assert "pip install -q -e ~/uniimage_jax" in remote

    (ssh,) = dry_run("tpu_setup.sh", *TPU, "--repo-url", "https://example.com/u.git", "--ref",
                     "v1", fake_bin=fake_bin)
    remote = option(ssh, "--command")
    assert "git clone https://example.com/u.git ~/uniimage_jax" in remote
    assert "checkout v1" in remote and "--worker=all" in ssh


def test_tpu_train_runs_stage_on_all_workers(fake_bin):
    (ssh,) = dry_run("tpu_train.sh", *TPU, "--stage", "ti2i_pretrain", "--workdir", "gs://bkt/run1",
                     "--env", "LIBTPU_INIT_ARGS=--xla_a=1 --xla_b=2",
                     "--", "--config.optim.lr=2e-4", fake_bin=fake_bin)
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod1"]
    assert "--worker=all" in ssh
    remote = option(ssh, "--command")
    # Parse the remote script's nohup command back into argv.
    nohup = next(part for part in remote.split("; ") if part.startswith("nohup"))
    argv = shlex.split(nohup.split(" > ")[0])
    assert argv[:2] == ["nohup", "env"]
    train = argv[argv.index("uniimage-train"):]
    assert train == ["uniimage-train", "--config", "configs/ti2i_pretrain.py:tbac_3b",
                     "--workdir", "gs://bkt/run1", "--config.optim.lr=2e-4"]
    env = argv[2:argv.index("uniimage-train")]
    assert "PYTHONUNBUFFERED=1" in env
    assert "JAX_COMPILATION_CACHE_DIR=gs://bkt/run1/jax_cache" in env
    assert "LIBTPU_INIT_ARGS=--xla_a=1 --xla_b=2" in env
    assert "unset JAX_COORDINATOR_ADDRESS JAX_NUM_PROCESSES JAX_PROCESS_ID" in remote
    assert "$HOME/uniimage_logs/ti2i_pretrain-$(hostname).log 2>&1" in remote  # a log per worker
    assert "cd $HOME/uniimage_jax" in remote


def test_tpu_train_rejects_bad_settings(fake_bin):
    base = [*TPU, "--stage", "finetune", "--workdir", "gs://b/r", "--dry-run"]
    local = launch("tpu_train.sh", *TPU, "--stage", "finetune", "--workdir", "/tmp/x", "--dry-run")
    assert local.returncode != 0 and "gs://" in local.stderr
    ok = dry_run("tpu_train.sh", *TPU, "--stage", "finetune", "--workdir", "/tmp/x",
                 "--allow-local-workdir", fake_bin=fake_bin)
    assert "--workdir /tmp/x" in option(ok[0], "--command")
    stage = launch("tpu_train.sh", *[a if a != "finetune" else "pretrain" for a in base])
    assert stage.returncode != 0 and "--stage 'pretrain'" in stage.stderr
    override = launch("tpu_train.sh", *base, "--", "lr=1")
    assert override.returncode != 0 and "'lr=1'" in override.stderr


def test_tpu_status_logs_delete(fake_bin):
    describe_qr, describe_vm = dry_run("tpu_status.sh", *TPU, fake_bin=fake_bin)
    assert describe_qr[:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "pod1"]
    assert describe_vm[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "pod1"]
    *_, procs = dry_run("tpu_status.sh", *TPU, "--processes", fake_bin=fake_bin)
    assert "--worker=all" in procs and "train.pid" in option(procs, "--command")

    (logs,) = dry_run("tpu_logs.sh", *TPU, "--stage", "finetune", fake_bin=fake_bin)
    assert "--worker=all" in logs
    assert option(logs, "--command") == "tail -n 50 $HOME/uniimage_logs/finetune-*.log"
    (logs,) = dry_run("tpu_logs.sh", *TPU, "--worker", "0", "--follow", fake_bin=fake_bin)
    assert "--worker=0" in logs and "-F" in option(logs, "--command")
    follow_all = launch("tpu_logs.sh", *TPU, "--follow", "--dry-run")
    assert follow_all.returncode != 0 and "--worker" in follow_all.stderr

    (delete,) = dry_run("tpu_delete.sh", *TPU, fake_bin=fake_bin)
    assert delete[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "pod1"]
    assert "--force" in delete and "--quiet" in delete
    unconfirmed = launch("tpu_delete.sh", *TPU, fake_bin=fake_bin)
    assert unconfirmed.returncode != 0 and "--yes" in unconfirmed.stderr
    assert not fake_bin[1].exists()


def test_xpk_workload(fake_bin):
    (cmd,) = dry_run("xpk/xpk_train.sh", "--cluster", "c1", "--zone", "us-east5-a", "--stage",
                     "t2i_pretrain", "--workdir", "gs://b/r", "--docker-image", "img:1",
                     "--num-slices", "2", "--", "--config.x=1", fake_bin=fake_bin)
    assert cmd[:3] == ["xpk", "workload", "create"]
    assert option(cmd, "--cluster") == "c1"
    assert option(cmd, "--workload") == "uniimage-t2i-pretrain"
    assert option(cmd, "--tpu-type") == "v5p-64"
    assert option(cmd, "--num-slices") == "2"
    assert option(cmd, "--docker-image") == "img:1"
    assert option(cmd, "--command").endswith(
        "uniimage-train --config configs/t2i_pretrain.py:tbac_3b --workdir gs://b/r --config.x=1")
    # SIGTERM must reach uniimage-train (exec), whose status 42 xpk restarts on by default
    assert option(cmd, "--command").startswith("cd /app && exec env PYTHONUNBUFFERED=1 ")
    assert "UNIIMAGE_RUN_ID=xpk-uniimage-t2i-pretrain" in option(cmd, "--command")
    assert option(cmd, "--max-restarts") == "10"
    assert option(cmd, "--termination-grace-period-seconds") == "300"


# ---------------------------------------------------------------------------------- GPU
def test_slurm_per_gpu(fake_bin):
    sbatch, srun = dry_run("slurm_train.sh", "--stage", "t2i_pretrain", "--workdir", "/shared/r",
                           "--partition", "h100", "--", "--config.batch_size=256",
                           fake_bin=fake_bin)
    assert sbatch[0] == "sbatch"
    assert option(sbatch, "--nodes") == "2"
    assert option(sbatch, "--gpus-per-node") == "8"
    assert option(sbatch, "--ntasks-per-node") == "8"
    assert option(sbatch, "--partition") == "h100"
    script = next(a for a in sbatch if a.endswith("slurm_train.sbatch"))
    job_args = sbatch[sbatch.index(script) + 1:]
    assert job_args[:2] == ["--stage", "t2i_pretrain"] and job_args[-2:] == ["--", "--config.batch_size=256"]
    assert srun[0] == "srun" and "--ntasks-per-node=8" in srun
    train = srun[srun.index("uniimage-train"):]
    assert train == ["uniimage-train", "--config", "configs/t2i_pretrain.py:tbac_3b", "--workdir",
                     "/shared/r", "--config.batch_size=256"]
    assert not any(a.startswith("JAX_COORDINATOR_ADDRESS") for a in srun)  # SLURM auto-detection
    assert not any(a.startswith("JAX_LOCAL_DEVICE_IDS") for a in srun)


def test_slurm_per_node(fake_bin):
    sbatch, srun = dry_run("slurm_train.sh", "--stage", "finetune", "--workdir", "/shared/r",
                           "--nodes", "4", "--tasks-per", "node", fake_bin=fake_bin)
    assert option(sbatch, "--nodes") == "4" and option(sbatch, "--ntasks-per-node") == "1"
    assert "--ntasks-per-node=1" in srun
    assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in srun  # one process drives all 8 GPUs


def test_sbatch_script_directly(fake_bin):
    (srun,) = dry_run("slurm_train.sbatch", "--stage", "ti2i_pretrain", "--workdir", "/s/r",
                      "--gpus-per-node", "4", fake_bin=fake_bin)
    assert "--ntasks-per-node=4" in srun and "configs/ti2i_pretrain.py:tbac_3b" in srun


def test_multiprocess_local_two(fake_bin):
    cmds = dry_run("multiprocess_train.sh", "--local", "2", "--cpu", "--stage", "t2i_pretrain",
                   "--workdir", "/tmp/w", "--", "--config.total_steps=2", fake_bin=fake_bin)
    assert len(cmds) == 2
    for i, cmd in enumerate(cmds):
        assert cmd[0] == "env"
        assert "JAX_COORDINATOR_ADDRESS=127.0.0.1:12355" in cmd
        assert "JAX_NUM_PROCESSES=2" in cmd
        assert f"JAX_PROCESS_ID={i}" in cmd
        assert "JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo" in cmd and "JAX_PLATFORMS=cpu" in cmd
        train = cmd[cmd.index("uniimage-train"):]
        assert train[:5] == ["uniimage-train", "--config", "configs/t2i_pretrain.py:tbac_3b",
                             "--workdir", "/tmp/w"]
        assert "--config.total_steps=2" in train
        assert train[-4:] == [">", f"./uniimage_logs/process_{i}.log", "2>&1", "&"]


def _fake_trainer(tmp_path, body):
    """A stand-in for uniimage-train (UNIIMAGE_TRAIN) that records what happens to it."""
    script = tmp_path / "fake_train"
    script.write_text(f"#!/usr/bin/env bash\nrecord={tmp_path}/record.log\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script), tmp_path / "record.log"


def _local(tmp_path, trainer):
    env = {**os.environ, "UNIIMAGE_TRAIN": trainer}
    return subprocess.Popen(["bash", str(LAUNCH / "multiprocess_train.sh"), "--local", "2",
                             "--stage", "finetune", "--workdir", str(tmp_path / "w"), "--log-dir",
                             str(tmp_path / "logs")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_multiprocess_local_passes_sigterm_on_and_exits_42_when_all_saved(tmp_path):
    trainer, record = _fake_trainer(tmp_path, """
trap 'echo "$JAX_PROCESS_ID saved" >> "$record"; exit 42' TERM
echo "$JAX_PROCESS_ID started" >> "$record"
while true; do sleep 0.05; done""")
    launcher = _local(tmp_path, trainer)
    deadline = time.time() + 30
    while time.time() < deadline and (not record.exists() or
                                      record.read_text().count("started") < 2):
        time.sleep(0.05)
    launcher.send_signal(signal.SIGTERM)  # a preemption of the whole job
    _, err = launcher.communicate(timeout=30)
    assert launcher.returncode == 42, err  # "restart me", as each process said
    saved = sorted(line for line in record.read_text().splitlines() if "saved" in line)
    assert saved == ["0 saved", "1 saved"]


def test_multiprocess_local_kills_the_others_when_one_fails(tmp_path):
    trainer, record = _fake_trainer(tmp_path, """
trap '' TERM  # a process that could only hang waiting for the failed one
if [ "$JAX_PROCESS_ID" = 1 ]; then sleep 0.5; exit 3; fi
while true; do sleep 0.05; done""")
    launcher = _local(tmp_path, trainer)
    _, err = launcher.communicate(timeout=30)
    assert launcher.returncode == 3 and "process 1 failed (exit status 3)" in err, err


@pytest.mark.parametrize("srun_status,restarts,requeued", [
    (42, 0, True), (134, 3, True), (42, 10, False), (1, 0, False), (2, 0, False), (0, 0, False)])
def test_sbatch_requeues_itself_on_restart_me_statuses(tmp_path, fake_bin, srun_status, restarts,
                                                       requeued):
    (fake_bin[0] / "srun").write_text(f"#!/usr/bin/env bash\nexit {srun_status}\n")
    env = {**os.environ, "PATH": f"{fake_bin[0]}:{os.environ['PATH']}", "SLURM_JOB_ID": "77",
           "SLURM_RESTART_COUNT": str(restarts)}
    out = subprocess.run(["bash", str(LAUNCH / "slurm_train.sbatch"), "--stage", "finetune",
                          "--workdir", str(tmp_path / "w")], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == srun_status, out.stderr
    calls = fake_bin[1].read_text() if fake_bin[1].exists() else ""
    assert ("scontrol requeue 77" in calls) == requeued, (calls, out.stderr)


def test_multiprocess_explicit_and_errors(fake_bin):
    (cmd,) = dry_run("multiprocess_train.sh", "--coordinator", "10.0.0.2:1234", "--num-processes",
                     "16", "--process-id", "3", "--stage", "finetune", "--workdir", "gs://b/r",
                     fake_bin=fake_bin)
    assert cmd[:1] == ["env"]
    assert {"JAX_COORDINATOR_ADDRESS=10.0.0.2:1234", "JAX_NUM_PROCESSES=16",
            "JAX_PROCESS_ID=3"} <= set(cmd)
    base = ["--stage", "finetune", "--workdir", "gs://b/r", "--dry-run"]
    no_pid = launch("multiprocess_train.sh", "--coordinator", "h:1", "--num-processes", "2", *base)
    assert no_pid.returncode != 0 and "--process-id" in no_pid.stderr
    out_of_range = launch("multiprocess_train.sh", "--coordinator", "h:1", "--num-processes", "2",
                          "--process-id", "2", *base)
    assert out_of_range.returncode != 0 and "--process-id" in out_of_range.stderr
    bad_coord = launch("multiprocess_train.sh", "--coordinator", "h", "--num-processes", "2",
                       "--process-id", "0", *base)
    assert bad_coord.returncode != 0 and "HOST:PORT" in bad_coord.stderr
    mixed = launch("multiprocess_train.sh", "--local", "2", "--process-id", "0", *base)
    assert mixed.returncode != 0 and "--local" in mixed.stderr


MISSING = [
    ("tpu_create.sh", ["--zone", "z"], "--tpu-name"),
    ("tpu_create.sh", ["--tpu-name", "t"], "--zone"),
    ("tpu_setup.sh", ["--zone", "z"], "--tpu-name"),
    ("tpu_setup.sh", ["--tpu-name", "t"], "--zone"),
    ("tpu_train.sh", [*TPU, "--stage", "finetune"], "--workdir"),
    ("tpu_train.sh", [*TPU, "--workdir", "gs://b/r"], "--stage"),
    ("tpu_train.sh", ["--zone", "z", "--stage", "finetune", "--workdir", "gs://b/r"], "--tpu-name"),
    ("tpu_train.sh", ["--tpu-name", "t", "--stage", "finetune", "--workdir", "gs://b/r"], "--zone"),
    ("tpu_status.sh", ["--tpu-name", "t"], "--zone"),
    ("tpu_logs.sh", ["--zone", "z"], "--tpu-name"),
    ("tpu_delete.sh", ["--tpu-name", "t"], "--zone"),
    ("xpk/xpk_train.sh", ["--cluster", "c", "--zone", "z", "--stage", "finetune", "--workdir",
                          "gs://b/r"], "--docker-image"),
    ("xpk/xpk_train.sh", ["--zone", "z", "--stage", "finetune", "--workdir", "gs://b/r",
                          "--docker-image", "i"], "--cluster"),
    ("slurm_train.sh", ["--stage", "finetune"], "--workdir"),
    ("slurm_train.sh", ["--workdir", "/s"], "--stage"),
    ("slurm_train.sbatch", ["--stage", "finetune"], "--workdir"),
    ("multiprocess_train.sh", ["--local", "2", "--stage", "finetune"], "--workdir"),
    ("multiprocess_train.sh", ["--stage", "finetune", "--workdir", "/w"], "--coordinator"),
]


@pytest.mark.parametrize("script,args,setting", MISSING, ids=[f"{s}-{m}" for s, _, m in MISSING])
def test_missing_setting_is_named(script, args, setting, fake_bin):
    result = launch(script, *args, "--dry-run", fake_bin=fake_bin)
    assert result.returncode != 0
    assert f"missing required setting {setting}" in result.stderr, result.stderr
    assert not fake_bin[1].exists()
