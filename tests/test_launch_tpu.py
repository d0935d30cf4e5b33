"""Tests for launch/tpu.sh: the gcloud command lines it prints, its errors, and what its remote
commands do when a shell runs them (against a fake gcloud that plays a 2-worker TPU VM).

The expected gcloud command lines are written out by hand from the gcloud reference
(`gcloud compute tpus tpu-vm create/ssh/scp/delete/describe --help`, `gcloud compute tpus
queued-resources create/delete/describe --help`, Cloud SDK 528); shlex (an independent POSIX
parser) reads what the script prints, and real bash/dash processes run the remote commands.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "tpu.sh"
BASH = shutil.which("bash") or "/bin/bash"
SUBCOMMANDS = ["create", "setup", "run", "logs", "stop", "status", "delete"]
ZONE, PROJECT = "us-central2-b", "my-proj"
SETTINGS = {"SIGLIP_TPU_PROJECT": PROJECT, "SIGLIP_TPU_ZONE": ZONE}
NOTES = 'a b "c"'  # an override value with spaces and double quotes
TRICKY = "it's $HOME `x` \\n;"  # single quote, $, backticks, backslash, semicolon


@pytest.fixture(autouse=True)
def _no_real_gcloud(tmp_path_factory, monkeypatch):
    """Puts a gcloud first on PATH that fails loudly: no test may reach the real one."""
    bin_dir = tmp_path_factory.mktemp("poison")
    (bin_dir / "gcloud").write_text("#!/bin/sh\necho 'test called the real gcloud' >&2\nexit 99\n")
    (bin_dir / "gcloud").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIGLIP_TPU_")}
    env.pop("PYTHON", None)
    env.update(extra or {})
    return env


def with_dry_run(args: list[str]) -> list[str]:
    """Inserts --dry-run before a bare -- (after it, it would be a trainer override)."""
    i = args.index("--") if "--" in args else len(args)
    return [*args[:i], "--dry-run", *args[i:]]


def sh(args: list[str], env: dict[str, str] | None = None, script: Path = SCRIPT,
       cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Runs the launch script with bash; settings only from `env` (none from the caller)."""
    return subprocess.run([BASH, str(script), *args], env=_env(env), cwd=cwd,
                          capture_output=True, text=True, timeout=60, check=False)


def dry(args: list[str], env: dict[str, str] | None = None, **kw) -> list[list[str]]:
    """The commands a --dry-run prints, each parsed back into argv by shlex."""
    res = sh(with_dry_run(args), {**SETTINGS, **(env or {})}, **kw)
    assert res.returncode == 0, res.stderr
    return [shlex.split(line) for line in res.stdout.splitlines()]


def make_repo(tmp_path: Path, plan: str | None = None, git: bool = False) -> Path:
    """A small copy of the repo: the script, configs/x.py and optionally a fake planner."""
    root = tmp_path / "repo"
    (root / "launch").mkdir(parents=True)
    (root / "configs").mkdir()
    shutil.copy(SCRIPT, root / "launch" / "tpu.sh")
    (root / "configs" / "x.py").write_text("def get_config(arg=None):\n  return None\n")
    (root / "pyproject.toml").write_text("[project]\nname = 'fake'\n")
    if plan is not None:
        (root / "siglip_jax").mkdir()
        (root / "siglip_jax" / "__init__.py").write_text("")
        (root / "siglip_jax" / "plan.py").write_text(plan)
    if git:
        g = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t"]
        subprocess.run([*g, "init", "-q"], check=True)
        subprocess.run([*g, "add", "."], check=True)
        subprocess.run([*g, "commit", "-q", "-m", "x"], check=True)
    return root


def flag(argv: list[str], name: str) -> str:
    """The value of --name=value in argv (exactly one occurrence)."""
    vals = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
    assert len(vals) == 1, (name, argv)
    return vals[0]


# ----------------------------------------------------------------------------- CLI surface


def test_script_parses():
    assert subprocess.run([BASH, "-n", str(SCRIPT)], check=False).returncode == 0


def test_script_passes_shellcheck():
    assert shutil.which("shellcheck"), "shellcheck missing: pip install -e '.[test]'"
    res = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["help"],
                                  *[[c, "--help"] for c in SUBCOMMANDS],
                                  *[["help", c] for c in SUBCOMMANDS]])
def test_help_exits_zero(args):
    res = sh(args)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("Usage: launch/tpu.sh")
    if args[-1] in SUBCOMMANDS or args[0] in SUBCOMMANDS:
        cmd = args[0] if args[0] in SUBCOMMANDS else args[1]
        assert res.stdout.startswith(f"Usage: launch/tpu.sh {cmd} NAME")


@pytest.mark.parametrize("args,message", [
    ([], "Usage: launch/tpu.sh"),
    (["frobnicate", "my-tpu"], "unknown command 'frobnicate'"),
    (["help", "frobnicate"], "unknown command 'frobnicate'"),
    (["create", "my-tpu", "--type", "v4-8", "--bogus"], "create: unknown option '--bogus'"),
    (["stop", "my-tpu", "--worker", "1"], "stop: unknown option '--worker'"),
    (["create", "my-tpu", "--type"], "create: --type needs a value"),
    (["create", "--type", "v4-8"], "create: missing the TPU name"),
    (["create", "a", "b", "--type", "v4-8"], "create: unexpected argument 'b'"),
    (["create", "My_TPU", "--type", "v4-8"], "create: bad TPU name 'My_TPU'"),
    (["create", "my-tpu", "--type", "tpu4"], "create: bad accelerator type 'tpu4'"),
    (["create", "my-tpu", "--type", "v4-8", "--spot", "--reserved"], "exclude each other"),
    (["logs", "my-tpu", "--worker", "first"], "logs: bad --worker 'first'"),
    (["stop", "my-tpu", "--timeout", "soon"], "stop: bad --timeout 'soon'"),
    (["setup", "my-tpu", "--python-version", "3"], "setup: bad --python-version '3'"),
    (["run", "my-tpu", "--config", "c.py", "--", "--dry-run"], "--dry-run after -- would go"),
])
def test_bad_usage_fails_with_one_line(args, message):
    res = sh([*args, "--dry-run"] if args else [], SETTINGS)
    assert res.returncode != 0
    assert message in res.stderr
    assert res.stdout == ""
    if args:
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
@pytest.mark.parametrize("missing,flag_name", [("SIGLIP_TPU_PROJECT", "--project"),
                                               ("SIGLIP_TPU_ZONE", "--zone")])
def test_missing_setting_names_flag_and_env(tmp_path, cmd, missing, flag_name):
    root = make_repo(tmp_path)
    extra = {"create": ["--type", "v4-8"], "run": ["--config", "configs/x.py", "--workdir",
                                                  "gs://b/r", "--skip-plan"]}.get(cmd, [])
    env = {k: v for k, v in SETTINGS.items() if k != missing}
    res = sh([cmd, "my-tpu", *extra, "--dry-run"], env, script=root / "launch" / "tpu.sh")
    assert res.returncode != 0
    line = res.stderr.strip()
    assert "\n" not in line
    assert flag_name in line and missing in line, line


def test_missing_type_and_workdir_name_flag_and_env(tmp_path):
    res = sh(["create", "my-tpu", "--dry-run"], SETTINGS)
    assert res.returncode != 0 and "--type" in res.stderr and "SIGLIP_TPU_TYPE" in res.stderr
    root = make_repo(tmp_path)
    res = sh(["run", "my-tpu", "--config", "configs/x.py", "--skip-plan", "--dry-run"], SETTINGS,
             script=root / "launch" / "tpu.sh")
    assert res.returncode != 0 and "--workdir" in res.stderr and "SIGLIP_TPU_BUCKET" in res.stderr


# ----------------------------------------------------------------------------- create / delete


def test_create_tpu_vm():
    assert dry(["create", "my-tpu", "--type", "v4-32"]) == [[
        "gcloud", "compute", "tpus", "tpu-vm", "create", "my-tpu", f"--zone={ZONE}",
        f"--project={PROJECT}", "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base"]]


@pytest.mark.parametrize("extra,flag_out", [(["--spot"], "--spot"), (["--reserved"], "--reserved")])
def test_create_capacity_flags(extra, flag_out):
    (argv,) = dry(["create", "my-tpu", "--type=v4-8", *extra])
    assert argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
    assert argv[-1] == flag_out
    assert "--spot" not in argv[:-1] and "--reserved" not in argv[:-1]


def test_create_queued_resource():
    assert dry(["create", "my-tpu", "--type", "v4-256", "--queued", "--spot"]) == [[
        "gcloud", "compute", "tpus", "queued-resources", "create", "my-tpu", f"--zone={ZONE}",
        f"--project={PROJECT}", "--node-id=my-tpu", "--accelerator-type=v4-256",
        "--runtime-version=tpu-ubuntu2204-base", "--spot"]]


@pytest.mark.parametrize("tpu_type,runtime", [
    ("v4-8", "tpu-ubuntu2204-base"), ("v4-1024", "tpu-ubuntu2204-base"),
    ("v3-32", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5p-8", "v2-alpha-tpuv5"), ("v6e-8", "v2-alpha-tpuv6e")])
def test_default_runtime_by_type(tpu_type, runtime):
    (argv,) = dry(["create", "my-tpu", "--type", tpu_type])
    assert flag(argv, "version") == runtime
    assert flag(argv, "accelerator-type") == tpu_type


def test_runtime_type_zone_project_from_env_and_flags_override_env():
    env = {"SIGLIP_TPU_RUNTIME": "v2-alpha-tpuv4", "SIGLIP_TPU_TYPE": "v4-16"}
    (argv,) = dry(["create", "my-tpu"], env)
    assert flag(argv, "version") == "v2-alpha-tpuv4"
    assert flag(argv, "accelerator-type") == "v4-16"
    assert (flag(argv, "zone"), flag(argv, "project")) == (ZONE, PROJECT)
    (argv,) = dry(["create", "my-tpu", "--type", "v4-8", "--runtime-version", "tpu-vm-base",
                   "--zone=europe-west4-a", "--project", "other"], env)
    assert flag(argv, "version") == "tpu-vm-base"
    assert flag(argv, "accelerator-type") == "v4-8"
    assert (flag(argv, "zone"), flag(argv, "project")) == ("europe-west4-a", "other")


def test_unknown_type_without_runtime_asks_for_runtime():
    res = sh(["create", "my-tpu", "--type", "v9x-8", "--dry-run"], SETTINGS)
    assert res.returncode != 0
    assert "--runtime-version" in res.stderr and "SIGLIP_TPU_RUNTIME" in res.stderr


def test_delete_status():
    base = [f"--zone={ZONE}", f"--project={PROJECT}"]
    tpus = ["gcloud", "compute", "tpus"]
    assert dry(["delete", "my-tpu"]) == [[*tpus, "tpu-vm", "delete", "my-tpu", *base]]
    assert dry(["delete", "my-tpu", "--yes"]) == [
        [*tpus, "tpu-vm", "delete", "my-tpu", *base, "--quiet"]]
    assert dry(["delete", "my-tpu", "--queued"]) == [
        [*tpus, "queued-resources", "delete", "my-tpu", *base, "--force"]]
    assert dry(["status", "my-tpu"]) == [[*tpus, "tpu-vm", "describe", "my-tpu", *base]]
    assert dry(["status", "my-tpu", "--queued"]) == [
        [*tpus, "queued-resources", "describe", "my-tpu", *base]]


# ----------------------------------------------------------------------------- ssh commands


def ssh_command(argv: list[str], worker: str = "all") -> str:
    """Checks a `gcloud compute tpus tpu-vm ssh` argv and returns its --command."""
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"], argv
    assert flag(argv, "zone") == ZONE and flag(argv, "project") == PROJECT
    assert flag(argv, "worker") == worker
    return flag(argv, "command")


def train_args(command: str) -> list[str]:
    """The trainer's argv inside a run --command, as a POSIX shell would split it."""
    words = shlex.split(command)
    start = words.index("siglip_jax.train") + 1
    assert words[start - 2:start] == ["-m", "siglip_jax.train"]
    return words[start:words.index(">", start)]


def test_run_quotes_overrides_through_ssh_command(tmp_path):
    root = make_repo(tmp_path)
    lines = dry(["run", "my-tpu", "--config", "configs/x.py:b16,size=2", "--workdir",
                 "gs://bkt/run 1", "--", f"--config.wandb.notes={NOTES}",
                 "--config.lr=1e-3", f"--config.name={TRICKY}"],
                script=root / "launch" / "tpu.sh")
    assert len(lines) == 1  # no plan.py in this repo: only the ssh line
    command = ssh_command(lines[0])
    assert train_args(command) == [
        "--config=configs/x.py:b16,size=2", "--workdir=gs://bkt/run 1",
        f"--config.wandb.notes={NOTES}", "--config.lr=1e-3", f"--config.name={TRICKY}"]
    for piece in ["setsid nohup", '> "$HOME/siglip_jax_logs/run.log" 2>&1 < /dev/null &',
                  'cd "$HOME/siglip_jax"', '"$HOME/siglip_jax_venv/bin/python" -m']:
        assert piece in command


def test_run_config_paths_and_workdir_default(tmp_path):
    root = make_repo(tmp_path)
    script = root / "launch" / "tpu.sh"
    bucket = {"SIGLIP_TPU_BUCKET": "gs://bkt/"}
    # An absolute path (or a path relative to the caller's cwd) becomes repo-relative.
    (argv,) = dry(["run", "my-tpu", "--config", str(root / "configs" / "x.py")], bucket,
                  script=script, cwd=tmp_path)
    assert train_args(ssh_command(argv))[:2] == ["--config=configs/x.py", "--workdir=gs://bkt/x"]
    (argv,) = dry(["run", "my-tpu", "--config=repo/configs/x.py", "--name", "b16"], bucket,
                  script=script, cwd=tmp_path)
    command = ssh_command(argv)
    assert train_args(command)[0] == "--config=configs/x.py"
    assert "$HOME/siglip_jax_logs/b16.log" in command and "$HOME/siglip_jax_logs/b16.pid" in command
    (tmp_path / "outside.py").write_text("")
    for config, message in [("configs/nope.py", "config not found: configs/nope.py"),
                            (str(tmp_path / "nope.py"), "config not found"),
                            (str(tmp_path / "outside.py"), "is outside the repo")]:
        res = sh(["run", "my-tpu", "--config", config, "--dry-run"], {**SETTINGS, **bucket},
                 script=script)
        assert res.returncode != 0 and message in res.stderr, res.stderr
    res = sh(["run", "my-tpu", "--config", "configs/x.py", "--dry-run", "--", "lr=1"],
             {**SETTINGS, **bucket}, script=script)
    assert res.returncode != 0 and "override 'lr=1' is not a flag" in res.stderr
    res = sh(["run", "my-tpu", "--config", "configs/x.py", "--config.lr=1", "--dry-run"],
             {**SETTINGS, **bucket}, script=script)
    assert res.returncode != 0 and "put config overrides after --" in res.stderr
    res = sh(["run", "my-tpu", "--config", "configs/x.py", "--workdir", "/tmp/w", "--dry-run"],
             SETTINGS, script=script)
    assert res.returncode == 0 and "not on gs://" in res.stderr


FAKE_PLAN = """import json, os, sys
with open(os.environ["PLAN_LOG"], "w") as f:
    json.dump(sys.argv[1:], f)
sys.exit(int(os.environ.get("PLAN_RC", "0")))
"""


def test_run_plan_step(tmp_path):
    script = make_repo(tmp_path / "a", plan=FAKE_PLAN) / "launch" / "tpu.sh"
    args = ["run", "my-tpu", "--config", "configs/x.py", "--workdir", "gs://b/r"]
    env = {"PYTHON": sys.executable}
    plan, ssh = dry([*args, "--type", "v4-32", "--", "--config.a=1"], env, script=script)
    import importlib.util

    compile_flag = ["--compile"] if importlib.util.find_spec("libtpu") else []
    assert plan == [sys.executable, "-m", "siglip_jax.plan", "--config=configs/x.py",
                    "--topology=v4-32", *compile_flag, "--config.a=1"]
    assert ssh[4] == "ssh"
    assert len(dry([*args, "--skip-plan"], env, script=script)) == 1
    res = sh([*args, "--dry-run"], {**SETTINGS, **env}, script=script)
    assert res.returncode != 0
    assert all(s in res.stderr for s in ["--type", "SIGLIP_TPU_TYPE", "--skip-plan"])
    # Without siglip_jax/plan.py the step is a no-op with a note.
    script = make_repo(tmp_path / "b") / "launch" / "tpu.sh"
    res = sh([*args, "--dry-run"], SETTINGS, script=script)
    assert res.returncode == 0 and "plan.py does not exist" in res.stderr
    assert len(res.stdout.splitlines()) == 1


def test_logs_and_stop_commands():
    (argv,) = dry(["logs", "my-tpu"])
    assert shlex.split(ssh_command(argv, worker="0"))[-4:] == [
        "tail", "-n", "100", "$HOME/siglip_jax_logs/run.log"]
    (argv,) = dry(["logs", "my-tpu", "--worker", "3", "-f", "--lines=20", "--name", "b16"])
    assert shlex.split(ssh_command(argv, worker="3"))[-5:] == [
        "tail", "-n", "20", "-F", "$HOME/siglip_jax_logs/b16.log"]
    (argv,) = dry(["logs", "my-tpu", "--worker=all"])
    ssh_command(argv, worker="all")
    (argv,) = dry(["stop", "my-tpu", "--timeout", "7"])
    command = ssh_command(argv)
    assert '[ "$i" -lt 7 ]' in command and 'kill -TERM -- "-$p"' in command


def test_setup_commands():
    git, scp, ssh = dry(["setup", "my-tpu"], {"TMPDIR": "/scratch"})
    tarball = "/scratch/siglip_jax-my-tpu.tar.gz"
    assert git == ["git", "-C", str(REPO), "archive", "--format=tar.gz", "--prefix=siglip_jax/",
                   "-o", tarball, "HEAD"]
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball,
                   "my-tpu:siglip_jax_src.tar.gz", f"--zone={ZONE}", f"--project={PROJECT}",
                   "--worker=all"]
    command = ssh_command(ssh)
    assert "python3 -m uv venv --clear --python 3.11" in command
    assert '"$HOME/siglip_jax_venv/bin/python" ".[tpu]"' in command
    (git, _, ssh) = dry(["setup", "my-tpu", "--ref", "v1.0", "--python-version", "3.12"])
    assert git[-1] == "v1.0" and "--python 3.12" in ssh_command(ssh)


# ----------------------------------------------------------------------------- end to end

FAKE_GCLOUD = r"""#!{python}
# A fake gcloud: logs its argv; plays scp/ssh on fake workers (one $HOME each); the rest is a no-op.
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(args) + "\n")
opts = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
homes = os.environ["FAKE_HOMES"].split(os.pathsep)
w = opts.get("worker", "0")
homes = homes if w == "all" else [homes[int(i)] for i in w.split(",")]
rc = 0
if args[:4] == ["compute", "tpus", "queued-resources", "describe"]:
    rc = 0 if os.environ.get("FAKE_QUEUED") else 1  # is there a queued resource of that name?
elif args[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
    for home in homes:
        shutil.copy(args[4], os.path.join(home, args[5].split(":", 1)[1]))
elif args[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
    for home in homes:
        env = {{"HOME": home, "PATH": os.environ["FAKE_REMOTE_PATH"]}}
        rc = max(rc, subprocess.run([os.environ.get("FAKE_SHELL", "bash"), "-c", opts["command"]],
                                    env=env, timeout=60).returncode)
sys.exit(rc)
"""

# Plays python3 on a worker (pip/uv) and, once `uv venv` made it, the venv's python (trainer).
FAKE_PYTHON = r"""#!{python}
import json, os, signal, sys, time
home = os.environ["HOME"]
args = sys.argv[1:]
with open(os.path.join(home, "python_calls.jsonl"), "a") as f:
    f.write(json.dumps({{"exe": sys.argv[0], "args": args, "cwd": os.getcwd()}}) + "\n")
if args[:3] == ["-m", "uv", "venv"]:
    venv_bin = os.path.join(args[-1], "bin")
    os.makedirs(venv_bin, exist_ok=True)
    with open(__file__) as src, open(os.path.join(venv_bin, "python"), "w") as dst:
        dst.write(src.read())
    os.chmod(os.path.join(venv_bin, "python"), 0o755)
if args[:2] == ["-m", "siglip_jax.train"]:
    if os.path.exists(os.path.join(home, "ignore_term")):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with open(os.path.join(home, "train.json.tmp"), "w") as f:
        json.dump({{"args": args[2:], "pid": os.getpid(), "pgid": os.getpgid(0),
                   "cwd": os.getcwd(), "unbuffered": os.environ.get("PYTHONUNBUFFERED")}}, f)
    os.replace(os.path.join(home, "train.json.tmp"), os.path.join(home, "train.json"))
    print("step 1 loss 0.5")
    time.sleep(30)
"""


class FakePod:
    """A fake gcloud on PATH whose ssh/scp act on 2 worker home directories."""

    def __init__(self, tmp_path: Path, shell: str = "bash"):
        self.log = tmp_path / "gcloud.jsonl"
        self.homes = [tmp_path / "w0", tmp_path / "w1"]
        local_bin, remote_bin = tmp_path / "bin", tmp_path / "remote_bin"
        for d in [*self.homes, local_bin, remote_bin]:
            d.mkdir()
        fakes = [(local_bin / "gcloud", FAKE_GCLOUD), (remote_bin / "python3", FAKE_PYTHON)]
        for path, text in fakes:
            path.write_text(text.format(python=sys.executable))
            path.chmod(0o755)
        self.env = {
            **SETTINGS, "PATH": f"{local_bin}{os.pathsep}{os.environ['PATH']}",
            "FAKE_GCLOUD_LOG": str(self.log), "FAKE_SHELL": shell, "TMPDIR": str(tmp_path),
            "FAKE_HOMES": os.pathsep.join(map(str, self.homes)),
            "FAKE_REMOTE_PATH": f"{remote_bin}{os.pathsep}{os.environ['PATH']}",
        }

    def calls(self) -> list[list[str]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()] \
            if self.log.exists() else []

    def train_info(self, home: Path) -> dict:
        path = home / "train.json"
        deadline = time.monotonic() + 10
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return json.loads(path.read_text())

    def kill_all(self):
        """Kills the fake trainers this pod started (by their process group)."""
        for home in self.homes:
            for path in [home / "train.json", home / "siglip_jax_logs" / "run.pid"]:
                try:
                    text = path.read_text()
                    pgid = json.loads(text)["pgid"] if path.suffix == ".json" else int(text)
                    os.killpg(pgid, signal.SIGKILL)
                except (OSError, ValueError, KeyError):
                    pass


def test_real_mode_runs_exactly_the_printed_commands(tmp_path):
    pod = FakePod(tmp_path)
    for args in [["create", "my-tpu", "--type", "v4-32", "--queued", "--reserved"],
                 ["create", "my-tpu", "--type", "v4-8"], ["delete", "my-tpu", "--queued"],
                 ["status", "my-tpu"], ["status", "my-tpu", "--queued"]]:
        expected = dry(args)
        pod.log.unlink(missing_ok=True)
        res = sh(args, {**pod.env, "FAKE_QUEUED": "1"})
        assert res.returncode == 0, res.stderr
        assert [["gcloud", *c] for c in pod.calls()] == expected
        assert res.stderr.startswith("+ gcloud compute tpus")


@pytest.mark.parametrize("queued", [False, True])
def test_delete_finds_out_whether_it_was_queued(tmp_path, queued):
    pod = FakePod(tmp_path)
    res = sh(["delete", "my-tpu", "--yes"], {**pod.env, "FAKE_QUEUED": "1" if queued else ""})
    assert res.returncode == 0, res.stderr
    probe = ["compute", "tpus", "queued-resources", "describe", "my-tpu", f"--zone={ZONE}",
             f"--project={PROJECT}", "--format=value(name)"]
    kind, extra = (["queued-resources"], ["--force"]) if queued else (["tpu-vm"], [])
    assert pod.calls() == [probe, ["compute", "tpus", *kind, "delete", "my-tpu", f"--zone={ZONE}",
                                   f"--project={PROJECT}", *extra, "--quiet"]]
    res = sh(["delete", "my-tpu", "--dry-run"], SETTINGS)
    assert "first checks for a queued resource" in res.stderr


def test_real_mode_without_gcloud_says_so(tmp_path):
    (tmp_path / "dirname").symlink_to(shutil.which("dirname"))  # all the script needs here
    res = sh(["status", "my-tpu"], {**SETTINGS, "PATH": str(tmp_path)})
    assert res.returncode != 0 and "gcloud not found" in res.stderr


@pytest.mark.parametrize("shell", ["bash", "dash"])
def test_setup_run_logs_stop_on_a_fake_pod(tmp_path, shell):
    """The whole session against a fake 2-worker pod; remote commands run in a real shell."""
    assert shutil.which(shell), f"{shell} is needed for this test (Debian: apt-get install {shell})"
    root = make_repo(tmp_path, git=True)
    script = root / "launch" / "tpu.sh"
    pod = FakePod(tmp_path, shell=shell)
    try:
        res = sh(["setup", "my-tpu"], pod.env, script=script)
        assert res.returncode == 0, res.stderr
        assert not (tmp_path / "siglip_jax-my-tpu.tar.gz").exists()  # local tarball cleaned
        shipped = subprocess.run(["git", "-C", str(root), "ls-tree", "-r", "--name-only", "HEAD"],
                                 capture_output=True, text=True, check=True).stdout.split()
        for home in pod.homes:
            unpacked = sorted(str(p.relative_to(home / "siglip_jax"))
                              for p in (home / "siglip_jax").rglob("*") if p.is_file())
            assert unpacked == sorted(shipped)
            assert not (home / "siglip_jax_src.tar.gz").exists()
            calls = [json.loads(x) for x in (home / "python_calls.jsonl").read_text().splitlines()]
            venv_py = f"{home}/siglip_jax_venv/bin/python"
            assert [c["args"] for c in calls] == [
                ["-m", "pip", "install", "--user", "--quiet", "--upgrade", "uv"],
                ["-m", "uv", "venv", "--clear", "--python", "3.11", f"{home}/siglip_jax_venv"],
                ["-m", "uv", "pip", "install", "--quiet", "--python", venv_py, ".[tpu]"],
                ["-c", "import jax, siglip_jax"]]
            assert calls[2]["cwd"] == str(home / "siglip_jax")
            assert calls[3]["exe"] == venv_py

        run = ["run", "my-tpu", "--config", "configs/x.py", "--workdir", "gs://bkt/run",
               "--skip-plan", "--", f"--config.wandb.notes={NOTES}", f"--config.name={TRICKY}"]
        (pod.homes[1] / "ignore_term").write_text("")  # worker 1's trainer ignores SIGTERM
        res = sh(run, pod.env, script=script)
        assert res.returncode == 0, res.stderr
        pids = []
        for home in pod.homes:
            info = pod.train_info(home)
            assert info["args"] == ["--config=configs/x.py", "--workdir=gs://bkt/run",
                                    f"--config.wandb.notes={NOTES}", f"--config.name={TRICKY}"]
            assert info["cwd"] == str(home / "siglip_jax")
            assert info["unbuffered"] == "1"
            assert info["pgid"] == info["pid"]  # own process group: stop can kill all of it
            assert (home / "siglip_jax_logs" / "run.pid").read_text().strip() == str(info["pid"])
            pids.append(info["pid"])
        # `run` has returned and every trainer still runs: they are detached from the ssh.
        assert all(_alive(pid) for pid in pids)
        res = sh(["logs", "my-tpu", "--worker", "1"], pod.env, script=script)
        assert res.returncode == 0 and "step 1 loss 0.5" in res.stdout, res.stderr
        assert str(pod.homes[1]) in res.stdout and str(pod.homes[0]) not in res.stdout

        # A second run while the first is alive is refused; so is setup.
        res = sh(run, pod.env, script=script)
        assert res.returncode != 0 and "run is already running" in res.stderr
        res = sh(["setup", "my-tpu"], pod.env, script=script)
        assert res.returncode != 0 and "a run is still going" in res.stderr

        # Worker 0 stops on SIGTERM; worker 1 needs the SIGKILL after --timeout.
        res = sh(["stop", "my-tpu", "--timeout", "1"], pod.env, script=script)
        assert res.returncode == 0, res.stderr
        assert f"stopped run (pid {pids[0]})" in res.stdout
        assert f"killed run (pid {pids[1]}) after 1s" in res.stdout
        for pid in pids:
            deadline = time.monotonic() + 5
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not _alive(pid)
        res = sh(["stop", "my-tpu"], pod.env, script=script)
        assert res.stdout.count("run is not running") == 2
    finally:
        pod.kill_all()


def _alive(pid: int) -> bool:
    """True if the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_run_aborts_when_the_planner_fails(tmp_path):
    root = make_repo(tmp_path, plan=FAKE_PLAN)
    pod = FakePod(tmp_path)
    env = {**pod.env, "PYTHON": sys.executable, "PLAN_LOG": str(tmp_path / "plan.json")}
    args = ["run", "my-tpu", "--config", "configs/x.py", "--workdir", "gs://b/r", "--type",
            "v4-32", "--", f"--config.wandb.notes={NOTES}"]
    res = sh(args, {**env, "PLAN_RC": "1"}, script=root / "launch" / "tpu.sh")
    assert res.returncode != 0 and "the planner rejected configs/x.py on v4-32" in res.stderr
    assert pod.calls() == []  # nothing reached the pod
    import importlib.util

    compile_flag = ["--compile"] if importlib.util.find_spec("libtpu") else []
    assert json.loads((tmp_path / "plan.json").read_text()) == [
        "--config=configs/x.py", "--topology=v4-32", *compile_flag,
        f"--config.wandb.notes={NOTES}"]
    sh(args, {**env, "PLAN_RC": "0"}, script=root / "launch" / "tpu.sh")
    assert [c[3] for c in pod.calls()] == ["ssh"]  # plan passed: on to the pod


def test_docs_examples_are_the_real_dry_run_output(tmp_path):
    """Every `$ launch/tpu.sh ... --dry-run` in docs/tpu.md prints exactly what follows it
    (tests/test_docs.py runs them in the real repository; here the setup example too)."""
    doc = (REPO / "docs" / "tpu.md").read_text()
    root = make_repo(tmp_path, plan="")  # A planner exists: dry runs of `run` print its line.
    (root / "configs" / "demo.py").write_text("")
    env = {"SIGLIP_TPU_PROJECT": "my-project", "SIGLIP_TPU_ZONE": "us-central2-b",
           "SIGLIP_TPU_BUCKET": "gs://my-bucket/siglip", "TMPDIR": "/tmp"}
    examples, lines = [], doc.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("$ launch/tpu.sh") and "--dry-run" in line:
            out = []
            for nxt in lines[i + 1:]:
                if nxt.startswith(("$ ", "```")):
                    break
                out.append(nxt)
            examples.append((shlex.split(line[2:])[1:], out))
    assert len(examples) >= 10
    for args, expected in examples:
        res = sh(args, env, script=root / "launch" / "tpu.sh")
        assert res.returncode == 0, (args, res.stderr)
        got = res.stdout.replace(str(root), "/home/you/siglip_jax").splitlines()
        assert got == expected, args
