"""scripts/tpu_pod.sh: the gcloud commands it prints under --dry-run, its errors, and (with a fake
gcloud that runs the ssh command here) that train.py gets its arguments intact through the two
shell levels of `gcloud ... ssh --command='bash -c ...'`. No gcloud or TPU needed; well under 5 s.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "tpu_pod.sh"
BASH = shutil.which("bash")

pytestmark = pytest.mark.skipif(BASH is None, reason="bash is not installed")

TRICKY = "model.name=it's a \"test\" $HOME `x` \\n"  # quotes, $, backticks, a backslash


def run(*args, env_extra=None, home=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_") and k != "GCLOUD"}
    env.update({"TPU_NAME": "my-tpu", "TPU_ZONE": "us-central2-b"})
    if home is not None:
        env["HOME"] = str(home)
    env.update(env_extra or {})
    return subprocess.run([BASH, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=30)


def dry(*args, **kw):
    """The printed commands of a successful --dry-run, each split into words."""
    p = run("--dry-run", *args, **kw)
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in p.stdout.splitlines() if ln and not ln.startswith("#")]
    return [shlex.split(ln) for ln in lines]


def remote_script(words):
    """The bash script an `ssh --command='bash -c SCRIPT'` command runs on the workers."""
    (cmd,) = [w[len("--command="):] for w in words if w.startswith("--command=")]
    bash, dash_c, script = shlex.split(cmd)
    assert (bash, dash_c) == ("bash", "-c")
    return script


def test_syntax_and_help():
    assert subprocess.run([BASH, "-n", str(SCRIPT)]).returncode == 0
    p = run("-h")
    assert p.returncode == 0 and "Usage:" in p.stdout and "--dry-run" in p.stdout


def test_create():
    describe, create = dry("create", "--accelerator-type=v4-32", "--spot", "--project", "proj")
    assert describe[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "my-tpu"]
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "my-tpu"]
    for flag in ("--zone=us-central2-b", "--project=proj", "--accelerator-type=v4-32",
                 "--version=tpu-ubuntu2204-base", "--spot"):
        assert flag in create
    # runtime versions follow the accelerator type unless given
    for accel, version in [("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v5p-32", "v2-alpha-tpuv5"),
                           ("v6e-16", "v2-alpha-tpuv6e")]:
        assert f"--version={version}" in dry("create", "--accelerator-type", accel)[-1]
    assert "--version=custom" in dry("create", "--accelerator-type=v4-8",
                                     env_extra={"TPU_RUNTIME_VERSION": "custom"})[-1]
    assert "--preemptible" in dry("create", "--accelerator-type=v4-8", "--preemptible")[-1]
    # queued resource
    qr = dry("create", "--queued", "--accelerator-type=v5litepod-16", "--spot")[-1]
    assert qr[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "my-tpu"]
    for flag in ("--node-id=my-tpu", "--zone=us-central2-b", "--accelerator-type=v5litepod-16",
                 "--runtime-version=v2-alpha-tpuv5-lite", "--spot"):
        assert flag in qr


def fake_gcloud(tmp_path: Path, describe_rc: int) -> dict:
    """A gcloud that logs its arguments, answers describe with describe_rc, and runs an ssh
    --command here with sh (as sshd would with the login shell)."""
    log = tmp_path / "gcloud.log"
    fake = tmp_path / "gcloud"
    fake.write_text(f"""#!{BASH}
printf '%s\\n' "$*" >> {shlex.quote(str(log))}
case "$4" in
  describe) [ {describe_rc} = 0 ] && printf 'READY\\tv4-32\\n'; exit {describe_rc} ;;
  ssh) for a; do case $a in --command=*) exec sh -c "${{a#--command=}}" ;; esac; done ;;
esac
exit 0
""")
    fake.chmod(0o755)
    return {"GCLOUD": str(fake), "log": log}


@pytest.mark.parametrize("exists", [True, False])
def test_create_reuses_an_existing_tpu(tmp_path, exists):
    fake = fake_gcloud(tmp_path, describe_rc=0 if exists else 1)
    p = run("create", "--accelerator-type=v4-32", env_extra={"GCLOUD": fake["GCLOUD"]})
    assert p.returncode == 0, p.stderr
    calls = fake["log"].read_text().splitlines()
    assert calls[0].startswith("compute tpus tpu-vm describe my-tpu --zone=us-central2-b")
    if exists:
        assert len(calls) == 1 and "reusing" in p.stderr
    else:
        assert calls[1].startswith("compute tpus tpu-vm create my-tpu")


def test_setup_copy_and_git():
    scp, ssh = dry("setup")
    assert scp[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse"]
    assert scp[6].endswith("/mnemax") and scp[7] == "my-tpu:"
    assert "--worker=all" in scp and "--zone=us-central2-b" in scp
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
    assert "--worker=all" in ssh and "--zone=us-central2-b" in ssh
    script = remote_script(ssh)
    assert 'pip install -e ".[tpu]"' in script and 'REPO="$HOME"/mnemax;' in script

    (ssh,) = dry("setup", "--git", "https://example.com/x/mnemax.git", "--branch", "dev",
                 "--repo-dir", "mx")
    script = remote_script(ssh)
    assert "git clone --branch dev https://example.com/x/mnemax.git" in script
    assert 'REPO="$HOME"/mx;' in script and 'pip install -e ".[tpu]"' in script


def test_train_dry_run():
    (ssh,) = dry("train", "--run-dir", "/mnt/ckpt/run 1", "configs/gla.yaml", "train.steps=10")
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
    assert "--worker=all" in ssh and "--zone=us-central2-b" in ssh
    script = remote_script(ssh)
    assert "ARGV=(train.py configs/gla.yaml train.steps=10 'run_dir=/mnt/ckpt/run 1')" in script
    # detached: started in the background on all workers, then worker 0's log followed
    start, follow = dry("train", "--detach", "nohup", "--run-dir=/r", "configs/gla.yaml")
    assert "--worker=all" in start and "nohup " in remote_script(start)
    assert "--worker=0" in follow and "tail -n 100 -F" in remote_script(follow)
    # a bucket run dir goes through as given (train.py writes it through etils.epath)
    (ssh,) = dry("train", "--run-dir=gs://bucket/runs/a", "configs/gla.yaml")
    assert "ARGV=(train.py configs/gla.yaml run_dir=gs://bucket/runs/a)" in remote_script(ssh)


def test_train_arguments_survive_the_remote_shells(tmp_path):
    """Run the ssh command here (fake gcloud) with a stub venv python that prints its argv."""
    fake = fake_gcloud(tmp_path, describe_rc=0)
    home = tmp_path / "home"
    (home / "mnemax").mkdir(parents=True)
    stub = home / "mnemax-venv" / "bin" / "python"
    stub.parent.mkdir(parents=True)
    stub.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    "print('ARGV=' + json.dumps([os.getcwd(), os.environ.get('WANDB_MODE')]"
                    " + sys.argv[1:]))\n")
    stub.chmod(0o755)
    p = run("train", "--env", "WANDB_MODE=offline", "--run-dir", "~/runs/a b",
            "configs/gla.yaml", TRICKY, "data.sizes=[1, 2]",
            env_extra={"GCLOUD": fake["GCLOUD"]}, home=home)
    assert p.returncode == 0, p.stderr
    (line,) = [ln for ln in p.stdout.splitlines() if ln.startswith("ARGV=")]
    assert json.loads(line[5:]) == [str(home / "mnemax"), "offline", "train.py", "configs/gla.yaml",
                                    TRICKY, "data.sizes=[1, 2]", f"run_dir={home}/runs/a b"]
    log = (home / "mnemax-logs" / "train.log").read_text()
    assert line in log and "python train.py configs/gla.yaml" in log


def test_delete_and_status():
    (delete,) = dry("delete")
    assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "my-tpu",
                      "--zone=us-central2-b"]
    assert "--quiet" in dry("delete", "--yes")[0]
    (qr,) = dry("delete", "--queued")
    assert qr[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "my-tpu"]
    assert "--force" in qr
    assert dry("status")[0][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "my-tpu"]
    (stop,) = dry("stop")
    assert "--worker=all" in stop and "kill -TERM" in remote_script(stop)


@pytest.mark.parametrize("args, env, message", [
    (["frobnicate"], {}, "unknown command 'frobnicate'"),
    ([], {}, "no command given"),
    (["--bogus", "status"], {}, "unknown option '--bogus'"),
    (["create", "--accelerator-type=v4-8"], {"TPU_NAME": ""}, "no TPU name"),
    (["status"], {"TPU_ZONE": ""}, "no zone"),
    (["create"], {}, "no accelerator type"),
    (["create", "--accelerator-type=v9-8"], {}, "no default runtime version"),
    (["create", "--accelerator-type=v4-8", "--spot", "--preemptible"], {}, "exclude each other"),
    (["train"], {}, "train needs a config"),
    (["train", "configs/gla.yaml"], {}, "no run dir"),
    (["train", "--run-dir=/r", "configs/gla.yaml", "steps"], {}, "not of the form"),
    (["train", "--run-dir=/r", "configs/gla.yaml", "run_dir=/s"], {}, "given twice"),
    (["train", "--detach=screen", "--run-dir=/r", "configs/gla.yaml"], {}, "--detach must be"),
    (["setup", "--repo-dir", "a b"], {}, "plain directory name"),
])
def test_errors_exit_2(args, env, message):
    p = run("--dry-run", *args, env_extra=env)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert message in p.stderr
    assert "gcloud" not in p.stdout  # nothing was printed to run


def test_missing_gcloud_is_an_error():
    p = run("status", env_extra={"GCLOUD": "/nonexistent/gcloud"})
    assert p.returncode == 2 and "not found" in p.stderr
