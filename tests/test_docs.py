"""The shell examples of README.md and docs/*.md run as written, so they cannot drift.

A fenced shell block (```sh, ```bash or ```console) is marked by an HTML comment on the line
right before its opening fence (the format is in docs/contributing.md):

    <!-- test: run -->                             run the block as written
    <!-- test: run; with A -> B; with C -> D -->   run it with text A replaced by B, C by D
    <!-- test: run; env K=V K2=V2 -->              run it with these environment variables
    <!-- test: skip: REASON -->                    never run it; the reason is required

Every shell block of README.md carries a marker; in docs/ unmarked blocks are illustrations.
A sh/bash block runs under `bash -euo pipefail` and must exit 0. In a console block the lines
starting with `$ ` are commands; the lines after one are its expected output, each of which
must appear in the real output in that order (`…` lines stand for omitted ones), and
`[exit code N]` is the expected exit code (default 0).

Every block runs in one sandbox: a temporary folder with links to the repository's configs/,
launch/, siglip_jax/ and benchmarks/, `/tmp/` in the text pointing into it, and HOME and
TMPDIR inside it — nothing is written elsewhere (but for the session's XLA compilation
cache, tests/conftest.py). The sandbox holds what the README's next
steps assume: the demo's workdir (`/tmp/siglip_demo`, a 5-step demo run on a smaller
dataset), a stand-in for a
downloaded Hugging Face checkpoint (`siglip-base-patch16-224`, a tiny random SigLIP with the
demo's tokenizer) and a CSV of demo pictures (`my_data/train.csv`).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The documentation's pages, in the README's order (test_docs_table_lists_every_page).
DOC_PAGES = ("python_api", "configs", "training", "data", "tpu", "checkpoints", "evaluation",
             "siglip2_models", "siglip2_training", "benchmarks", "architecture", "contributing")
DOC_FILES = ["README.md"] + sorted(
    os.path.join("docs", f) for f in os.listdir(os.path.join(REPO, "docs")) if f.endswith(".md"))
SHELL_LANGS = ("sh", "bash", "console", "shell", "python")  # A python block runs in python.
MARKER = re.compile(r"^<!--\s*test:\s*(.*?)\s*-->\s*$")
LINKED = ("configs", "launch", "siglip_jax", "benchmarks")
TIMEOUT_S = 600
# The sandbox's demo run: 5 steps on 4 pictures per class (2 held out), evaluated once.
DEMO_SMALLER = ["--config.input.data.train_per_class=4", "--config.input.data.test_per_class=2",
                "--config.evals.zeroshot.data.train_per_class=4",
                "--config.evals.zeroshot.data.test_per_class=2",
                "--config.evals.zeroshot.batch_size=72", "--config.input.shuffle_buffer=16"]


@dataclasses.dataclass
class Block:
    """One fenced shell block and its marker."""

    path: str
    line: int  # 1-based line of the opening fence.
    lang: str
    text: str
    marker: str | None  # The marker's text after "test:", or None.

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"


def parse_blocks(path: str) -> list[Block]:
    """The fenced shell blocks of a markdown file with the marker right before each."""
    lines = open(os.path.join(REPO, path), encoding="utf-8").read().split("\n")
    blocks, i = [], 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        start, lang = i, fence.group(1)
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            i += 1
        marker = MARKER.match(lines[start - 1]) if start else None
        if lang in SHELL_LANGS:
            blocks.append(Block(path, start + 1, lang, "\n".join(lines[start + 1:i]),
                                marker.group(1) if marker else None))
        i += 1
    return blocks


@dataclasses.dataclass
class Directive:
    """A parsed marker: run or skip, with replacements and environment."""

    run: bool
    reason: str = ""
    replace: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    env: dict[str, str] = dataclasses.field(default_factory=dict)


def parse_marker(marker: str, where: str) -> Directive:
    """Parses `run[; with A -> B][; env K=V ...]` or `skip: REASON`; raises ValueError."""
    if marker.startswith("skip"):
        reason = marker[4:].lstrip(":").strip()
        if not reason:
            raise ValueError(f"{where}: 'test: skip' needs a reason: <!-- test: skip: WHY -->")
        return Directive(run=False, reason=reason)
    parts = [p.strip() for p in marker.split(";")]
    if parts[0] != "run":
        raise ValueError(f"{where}: marker {marker!r} must start with 'run' or 'skip: REASON'")
    directive = Directive(run=True)
    for part in parts[1:]:
        if part.startswith("with ") and " -> " in part:
            old, new = part[5:].split(" -> ", 1)
            directive.replace.append((old, new))
        elif part.startswith("env "):
            for item in shlex.split(part[4:]):
                key, sep, value = item.partition("=")
                if not sep:
                    raise ValueError(f"{where}: env item {item!r} is not KEY=VALUE")
                directive.env[key] = value
        else:
            raise ValueError(f"{where}: unknown marker option {part!r} (with A -> B, env K=V)")
    return directive


ALL_BLOCKS = [b for path in DOC_FILES for b in parse_blocks(path)]
RUNNABLE = [b for b in ALL_BLOCKS if b.marker and b.marker.startswith("run")]


# ----------------------------------------------------------------------------- static checks


def test_readme_is_a_short_guide():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        assert len(f.read().split("\n")) <= 350


def test_every_readme_shell_block_is_marked_and_every_marker_parses():
    unmarked = [b.id for b in ALL_BLOCKS if b.path == "README.md" and b.marker is None]
    assert not unmarked, f"README shell blocks need <!-- test: run --> or skip: {unmarked}"
    for block in ALL_BLOCKS:
        if block.marker is not None:
            parse_marker(block.marker, block.id)
    assert RUNNABLE, "no runnable block found"


def test_a_marker_stands_only_before_a_shell_block():
    for path in DOC_FILES:
        lines = open(os.path.join(REPO, path), encoding="utf-8").read().split("\n")
        for number, line in enumerate(lines[:-1], 1):
            if MARKER.match(line):
                assert re.match(r"^```(" + "|".join(SHELL_LANGS) + r")\s*$", lines[number]), (
                    f"{path}:{number}: a test marker must be followed by a shell block")


def test_replacements_apply_to_the_block():
    for block in RUNNABLE:
        for old, _ in parse_marker(block.marker, block.id).replace:
            assert old in block.text, f"{block.id}: 'with {old} -> …' matches nothing"


def test_ci_runs_the_readme_test_command():
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    command = re.search(r'^pip install -e "\.\[test\]" && (python -m pytest .*)$', readme, re.M)
    assert command, "README: the test command line is missing"
    assert re.search(r'^pip install -e "\.\[test,parity\]"', readme, re.M), (
        "README: the optional parity line is missing")
    ci = open(os.path.join(REPO, ".ci", "run"), encoding="utf-8").read().split("\n")
    assert command.group(1) in ci, ".ci/run must run the README's pytest command as is"
    assert any(re.search(r'pip install .*-e "\.\[test,parity\]"', line) for line in ci)
    assert any(re.search(r"^export PYTEST_ADDOPTS=.*--durations=20", line) for line in ci), (
        ".ci/run must print the 20 slowest tests")


def _read(path: str) -> str:
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        return f.read()


def test_docs_folder_holds_exactly_the_documented_pages():
    assert sorted(DOC_FILES[1:]) == sorted(f"docs/{name}.md" for name in DOC_PAGES)


def test_docs_table_lists_every_page():
    readme = _read("README.md")
    table = readme[readme.index("## Documentation"):]
    table = table[:table.index("\n## ")]
    linked = re.findall(r"^\| \[[^]]+\]\(docs/([a-z0-9_]+)\.md\) \|", table, re.M)
    assert tuple(linked) == DOC_PAGES, "README's docs table must list every page of docs/, once"


def test_readme_suite_size_and_time_are_contributings():
    """The README's test count and suite time are the measured ones docs/contributing.md gives
    (the CI run of the last landing), so the two cannot drift apart."""
    measured = re.search(r"\*\*(\d+) passed, (\d+) deselected in (\d+) s\*\* \((\d+) min (\d+) s",
                         _read("docs/contributing.md"))
    assert measured, ("docs/contributing.md: the measured '**N passed, M deselected in S s** "
                      "(m min s s' is missing")
    passed, seconds = int(measured.group(1)), int(measured.group(3))
    assert seconds == 60 * int(measured.group(4)) + int(measured.group(5))
    readme = re.search(r"(\d+) min (\d+) s \((\d+) tests", _read("README.md"))
    assert readme, "README: the suite time 'm min s s (N tests' is missing"
    assert int(readme.group(3)) == passed
    assert 60 * int(readme.group(1)) + int(readme.group(2)) == seconds


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower-case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^]]*)\]\([^)]*\)", r"\1", heading).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(text: str) -> set[str]:
    anchors, seen, fenced = set(), {}, False
    for line in text.split("\n"):
        if re.match(r"^```\w*\s*$", line):
            fenced = not fenced
        heading = None if fenced else re.match(r"^#+ (.*)$", line)
        anchors.update(re.findall(r'<a id="([^"]+)"></a>', line))  # an explicit anchor
        if heading:
            slug = _slug(heading.group(1).strip())
            anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def _links(text: str) -> list[str]:
    """Targets of the markdown links outside code fences and code spans."""
    targets, fenced = [], False
    for line in text.split("\n"):
        if re.match(r"^```\w*\s*$", line):
            fenced = not fenced
        if not fenced:
            targets += re.findall(r"\]\(([^)\s]+)\)", re.sub(r"`[^`]*`", "", line))
    return targets


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for path in DOC_FILES:
        for target in _links(_read(path)):
            if re.match(r"^[a-z]+:", target):
                continue  # http(s), mailto: not checked here.
            file, _, anchor = target.partition("#")
            resolved = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
            if not os.path.exists(os.path.join(REPO, resolved)):
                broken.append(f"{path}: {target} (no file {resolved})")
            elif anchor and resolved.endswith(".md") and anchor not in _anchors(_read(resolved)):
                broken.append(f"{path}: {target} (no heading #{anchor} in {resolved})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_parse_marker_rejects_bad_markers():
    with pytest.raises(ValueError, match="needs a reason"):
        parse_marker("skip", "x.md:1")
    with pytest.raises(ValueError, match="unknown marker option"):
        parse_marker("run; sometimes", "x.md:1")
    d = parse_marker("run; with a -> b; env K=1 L='x y'", "x.md:1")
    assert d.run and d.replace == [("a", "b")] and d.env == {"K": "1", "L": "x y"}


# ----------------------------------------------------------------------------- the sandbox


def _env(root: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SIGLIP_", "PYTEST_")) and k != "PYTHONPATH"}
    env.update(HOME=os.path.join(root, "home"), TMPDIR=os.path.join(root, "tmp"),
               PYTHONPATH=REPO, JAX_PLATFORMS="cpu", PYTHONDONTWRITEBYTECODE="1")
    env.update(extra or {})
    return env


def _make_checkpoint_and_csv(root: str) -> None:
    """A tiny random SigLIP saved as a HF directory, and a CSV of 16 demo pictures."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from siglip_jax.checkpoints import hf
    from siglip_jax.data import demo_shapes
    from siglip_jax.data.tokenizer import train_sentencepiece
    from siglip_jax.models.two_towers import Model

    ckpt = os.path.join(root, "siglip-base-patch16-224")
    os.makedirs(ckpt)
    train_sentencepiece(demo_shapes.tokenizer_corpus(), 64, os.path.join(ckpt, "spiece.model"),
                        model_type="word")
    kwargs = dict(image=dict(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8,
                             posemb="learn", pool_type="map"),
                  text=dict(vocab_size=64, width=32, depth=1, mlp_dim=64, num_heads=2,
                            pool_type="last"),
                  out_dim=(None, 32), temperature_init=10.0, bias_init=-10.0)
    params = jax.jit(Model(**kwargs).init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                           jnp.zeros((1, 8), jnp.int32))["params"]
    hf.save_hf(ckpt, jax.tree.map(np.asarray, params), kwargs, 32, 8)
    data = os.path.join(root, "my_data")
    os.makedirs(os.path.join(data, "images"))
    rows = []
    classes = [(c, s) for c in demo_shapes.COLOURS for s in demo_shapes.SHAPES]
    for i, (colour, shape) in enumerate(classes[:16]):
        demo_shapes.write_png(os.path.join(data, "images", f"{i}.png"), colour, shape, seed=i)
        rows.append((f"images/{i}.png", f"a {colour} {shape}"))
    with open(os.path.join(data, "train.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """The folder every block runs in, with the demo workdir, checkpoint and CSV ready."""
    root = str(tmp_path_factory.mktemp("docs"))
    for name in ("home", "tmp"):
        os.makedirs(os.path.join(root, name))
    for name in LINKED:
        os.symlink(os.path.join(REPO, name), os.path.join(root, name))
    demo = subprocess.Popen(  # Runs while this process makes the checkpoint and the CSV.
        [sys.executable, "-m", "siglip_jax.train", "--config", "configs/demo.py:steps=5",
         "--workdir", os.path.join(root, "tmp", "siglip_demo"), *DEMO_SMALLER],
        cwd=root, env=_env(root), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _make_checkpoint_and_csv(root)
        stdout, stderr = demo.communicate(timeout=TIMEOUT_S)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.communicate()
    assert demo.returncode == 0, stdout[-2000:] + stderr[-2000:]
    return root


def _console_steps(text: str) -> list[tuple[str, list[str], int]]:
    """(command, expected output lines, expected exit code) per `$ ` line of a console block."""
    steps: list[tuple[str, list[str], int]] = []
    for line in text.split("\n"):
        if line.startswith("$ "):
            steps.append((line[2:], [], 0))
        elif steps and (code := re.fullmatch(r"\[exit code (\d+)\]", line.strip())):
            steps[-1] = (steps[-1][0], steps[-1][1], int(code.group(1)))
        elif steps and line.strip() and line.strip() != "…":
            steps[-1][1].append(line)
    return steps


def _run(command: str, root: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=root, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_block_runs_as_written(block, sandbox):
    directive = parse_marker(block.marker, block.id)
    text = block.text
    for old, new in directive.replace:
        text = text.replace(old, new)
    text = text.replace("/tmp/", os.path.join(sandbox, "tmp") + "/")
    env = _env(sandbox, directive.env)
    if block.lang == "python":
        result = subprocess.run([sys.executable, "-c", text], cwd=sandbox, env=env,
                                capture_output=True, text=True, timeout=TIMEOUT_S)
        assert result.returncode == 0, (
            f"{block.id} exited {result.returncode}\n--- stderr\n{result.stderr[-3000:]}")
        return
    if block.lang != "console":
        result = _run(text, sandbox, env)
        assert result.returncode == 0, (
            f"{block.id} exited {result.returncode}\n--- stdout\n{result.stdout[-3000:]}"
            f"\n--- stderr\n{result.stderr[-3000:]}")
        return
    for command, expected, code in _console_steps(text):
        result = _run(command, sandbox, env)
        assert result.returncode == code, (
            f"{block.id}: `{command}` exited {result.returncode}, the docs say {code}\n"
            f"{result.stderr[-3000:]}")
        output = (result.stdout + result.stderr).split("\n")
        position = 0
        for want in expected:
            while position < len(output) and output[position].rstrip() != want.rstrip():
                position += 1
            assert position < len(output), (
                f"{block.id}: `{command}` did not print (in this order):\n{want}\n"
                f"--- it printed\n{result.stdout[-3000:]}{result.stderr[-2000:]}")
            position += 1


def test_contributing_lists_every_test_file():
    """docs/contributing.md's table of test files names each file in tests/ (and no other)."""
    text = _read("docs/contributing.md")
    named = set(re.findall(r"`(test_\w+\.py)`", text))
    present = {f for f in os.listdir(os.path.join(REPO, "tests"))
               if re.fullmatch(r"test_\w+\.py", f)}
    assert present <= named, f"not in docs/contributing.md: {sorted(present - named)}"
    assert named <= present, f"named in docs/contributing.md but missing: {sorted(named - present)}"
