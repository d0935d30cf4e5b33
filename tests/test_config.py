"""Config loading, overrides and their one-line errors."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from siglip_jax import train as train_cli
from siglip_jax.config import ConfigError, apply_override, load_config, parse_config_arg, split_spec

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = textwrap.dedent('''
    import ml_collections

    def get_config(arg=None):
        c = ml_collections.ConfigDict()
        c.total_steps = 10
        c.lr = 1e-3
        c.name = "run"
        c.flag = False
        c.shape = (1, 2)
        c.optional = None
        c.optim = dict(name="adam", b2=0.95)
        c.arg = arg
        return c
''')


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "exp.py"
    path.write_text(CONFIG)
    return str(path)


def test_split_spec():
    assert split_spec("configs/a.py:steps=3,x=1") == ("configs/a.py", "steps=3,x=1")
    assert split_spec("configs/a.py") == ("configs/a.py", None)


def test_overrides_are_typed(config_file):
    c = load_config(config_file + ":hello", [
        "total_steps=20", "lr=3", "name=other run", "flag=true", "shape=(3, 4)",
        "optional=[1, 2]", "optim.b2=0.99"])
    assert c.total_steps == 20 and isinstance(c.total_steps, int)
    assert c.lr == 3.0 and isinstance(c.lr, float)
    assert c.name == "other run"
    assert c.flag is True
    assert c.shape == (3, 4)
    assert c.optional == [1, 2]
    assert c.optim.b2 == 0.99
    assert c.arg == "hello"


def test_a_group_can_be_replaced_by_a_whole_dict_or_list(config_file):
    c = load_config(config_file, ['optim=[("img/.*", None), (".*", {"name": "sgd"})]'])
    assert c.optim == [("img/.*", None), (".*", {"name": "sgd"})]
    c = load_config(config_file, ['optim={"name": "sgd"}'])
    assert c.optim.to_dict() == {"name": "sgd"}


def test_config_is_locked(config_file):
    c = load_config(config_file)
    with pytest.raises(AttributeError):
        c.new_key = 1


@pytest.mark.parametrize("override, message", [
    ("total_step=3", "unknown config key 'total_step'; valid keys under <top level>: arg, flag"),
    ("optim.b3=0.9", "unknown config key 'optim.b3'; valid keys under optim: b2, name"),
    ("total_steps=abc", "config key 'total_steps' expects an int, got 'abc'"),
    ("total_steps=1.5", "config key 'total_steps' expects an int, got '1.5'"),
    ("flag=maybe", "config key 'flag' expects a bool (true/false), got 'maybe'"),
    ("lr.x=1", "config key 'lr' is a value, not a group"),
    ("optim=3", "config key 'optim' is a group; set its fields one by one (valid: b2, name)"),
    ("novalue", "override 'novalue' is not of the form key=value"),
])
def test_override_errors_name_the_key(config_file, override, message):
    c = load_config(config_file)
    c.unlock()
    with pytest.raises(ConfigError) as e:
        apply_override(c, override)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_file_and_missing_get_config(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: 'nope.py'"):
        load_config("nope.py")
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="defines no get_config"):
        load_config(str(bad))


def test_parse_config_arg():
    assert parse_config_arg("steps=20,name=a,lr=0.1") == {"steps": 20, "name": "a", "lr": 0.1}
    with pytest.raises(ConfigError, match="'oops' is not of the form key=value"):
        parse_config_arg("oops")


DEMO_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "demo.py")


def _run_trains(*arg_lists):
    """Runs the train CLI once per argument list, all at once (each process spends most of its
    time importing, which the cores can share), and returns the finished processes in order."""
    procs = [subprocess.Popen([sys.executable, "-m", "siglip_jax.train", *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for args in arg_lists]
    results = []
    for args, proc in zip(arg_lists, procs, strict=True):
        stdout, stderr = proc.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(args, proc.returncode, stdout, stderr))
    return results


def test_cli_errors_are_one_line(tmp_path):
    """Missing config, unknown key and unwritable workdir: one line on stderr, exit code 2."""
    cases = [
        (["--config", "missing.py", "--workdir", str(tmp_path / "w")],
         "error: config file not found: 'missing.py'"),
        (["--config", DEMO_CONFIG, "--workdir", str(tmp_path / "w"),
          "--config.total_stepz=3"], "error: unknown config key 'total_stepz'"),
        (["--config", DEMO_CONFIG, "--workdir", "/proc/forbidden/workdir"],
         "error: workdir '/proc/forbidden/workdir' is not writable"),
    ]
    results = _run_trains(*(args for args, _ in cases))
    for (_, message), result in zip(cases, results, strict=True):
        lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 2, result.stderr
        assert len(lines) == 1 and lines[0].startswith(message), result.stderr
        assert "Traceback" not in result.stderr


def test_config_mistakes_found_after_start_are_one_line_exit_2(tmp_path, capfd):
    """Bad values, a mesh that does not divide the devices, a rule matching nothing and a bad
    pp string: one `error:` line and exit code 2, also once training machinery started. The
    CLI's main() runs in this process (8 emulated devices, as the CLI's default config), which
    spares five process starts; test_cli_errors_are_one_line runs the real processes."""
    import tiny


    base = ["--config", f"{DEMO_CONFIG}:steps=4", "--workdir", str(tmp_path / "w"),
            *(f"--config.{o}" for o in tiny.tiny_overrides(tmp_path / "data"))]
    cases = [
        (["--config.log_every=0"], "error: config key log_every must be >= 1, got 0"),
        (["--config.total_steps=-5"], "error: config key total_steps must be >= 1, got -5"),
        (["--config.mesh=[('data', 3)]"], "error: config key mesh: mesh [('data', 3)] does "
                                          "not divide the 8 devices"),
        (["--config.sharding_rules=[('nomatch/.*', 'replicate')]"],
         "error: sharding rule regex 'nomatch/.*' matches no parameter"),
        (["--config.input.pp=value_range(-1, 1)|flatten"], "error: "),
    ]
    for extra, message in cases:
        code = train_cli.main([*base, *extra])
        _, stderr = capfd.readouterr()
        lines = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert code == 2, (extra, stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith(message), (extra, stderr[-2000:])
        assert "Traceback" not in stderr


CONFIG_FILES = sorted(f"configs/{n}" for n in os.listdir(os.path.join(REPO_ROOT, "configs"))
                      if n.endswith(".py"))


@pytest.mark.parametrize("path", CONFIG_FILES)
def test_every_config_rejects_an_unknown_argument_naming_the_valid_ones(path):
    """`configs/demo.py:step=5` (a typo for steps) is an error, not the 1000-step default."""
    with pytest.raises(ConfigError, match=r"unknown config argument 'step'; valid arguments: "):
        load_config(os.path.join(REPO_ROOT, f"{path}:step=5"))


def test_finetune_csv_checks_its_paths_and_stores_them_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = os.path.join(REPO_ROOT, "configs/finetune_csv.py")
    with pytest.raises(ConfigError, match=r"init='/nope' does not exist"):
        load_config(f"{spec}:init=/nope,csv=x.csv")
    (tmp_path / "train.csv").write_text("image,caption\n")
    with pytest.raises(ConfigError, match=rf"init='{tmp_path}/ckpt' does not exist"):
        load_config(f"{spec}:init=ckpt,csv=train.csv")  # Relative: made absolute first.
