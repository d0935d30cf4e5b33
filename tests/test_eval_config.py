"""The `evals.<name>` sections: each type's keys come from its evaluator's options record, and
the docs that list the keys and their defaults agree with those records."""

import ast
import os
import re
import subprocess
import sys

import pytest

from siglip_jax.config import ConfigError
from siglip_jax.evaluators import common
from siglip_jax.evaluators.config import OPTIONS, EvalConfig, option_defaults, option_keys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSV = {"name": "csv", "path": "x.csv"}


def _doc(name):
    with open(os.path.join(REPO, "docs", name), encoding="utf-8") as f:
        return f.read()


def _default(cell):
    """A table cell's default as a value: `"class"` → "class", `None (required…)` → None."""
    text = cell.strip().split(" (")[0].strip("`")
    return ast.literal_eval(text)


def _rows(text, header):
    """Cells of the rows of the markdown table under the line `header` (up to a blank line)."""
    lines = text.splitlines()
    start = lines.index(header) + 2  # Past the header and the |---| line.
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def test_evaluation_doc_table_is_the_options_records():
    documented = {}
    for kind, key, default in _rows(_doc("configs.md"), "| type | key | default |"):
        documented.setdefault(kind.strip("`"), {})[key.strip("`")] = _default(default)
    assert documented == {kind: option_defaults(kind) for kind in OPTIONS}


def test_dense_probe_and_decoder_docs_agree_with_the_records():
    dense = {key.strip("`"): _default(default)
             for key, default, _ in _rows(_doc("evaluation.md"), "| key | default | meaning |")}
    assert dense == option_defaults("dense_probe")
    decoder = {(key.strip("`"), types): _default(default)
               for key, types, default, _ in _rows(_doc("evaluation.md"),
                                                         "| key | types | default | meaning |")}
    assert decoder == {("parallel", "all three"): option_defaults("captioning")["parallel"],
                       ("constrain_boxes", "`referring`"):
                           option_defaults("referring")["constrain_boxes"]}
    assert option_keys("captioning") == option_keys("grounded_captioning") == ("parallel",)


def test_schema_takes_each_types_keys_from_its_evaluator():
    from siglip_jax import schema

    assert schema.EvalConfig is EvalConfig
    for kind, record in OPTIONS.items():
        spec = EvalConfig.parse("x", {"type": kind, "data": CSV, "pp": "keep('image')"})
        assert spec.options == record()  # Every own key at its record's default.
        assert (spec.every_n_steps, spec.batch_size) == (0, 256)
        with pytest.raises(ConfigError, match=rf"unknown config key evals.x.colour; valid keys "
                                              rf"under evals.x: .*{option_keys(kind)[0]}"):
            EvalConfig.parse("x", {"type": kind, "data": CSV, "pp": "", "colour": 1})
    spec = EvalConfig.parse("x", {"type": "zeroshot", "data": CSV, "pp": "", "every_n_steps": 5,
                                  "class_names": ["a", "b"], "templates": "{}"})
    assert spec.options.class_names == ("a", "b") and spec.every_n_steps == 5


@pytest.mark.parametrize("section, message", [
    ({"type": "retrieval", "max_captions": -1}, "config key evals.x.max_captions must be >= 0"),
    ({"type": "retrieval", "max_captions": 2.5}, "evals.x.max_captions expects an int"),
    ({"type": "zeroshot", "canonicalize": "yes"}, "evals.x.canonicalize expects true or false"),
    ({"type": "captioning", "parallel": 1}, "evals.x.parallel expects true or false"),
    ({"type": "referring", "constrain_boxes": None},
     "evals.x.constrain_boxes expects true or false"),
    ({"type": "captioning", "constrain_boxes": False}, "unknown config key "
                                                       "evals.x.constrain_boxes"),
    ({"type": "dense_probe", "train_data": {"name": "nope"}},
     "evals.x.train_data.name 'nope' is not one of"),
    ({"type": "dense_probe", "batch_size": 0}, "evals.x.batch_size must be >= 1"),
    ({"type": "linear"}, "evals.x.type 'linear' is not one of ('zeroshot', 'retrieval', "),
])
def test_bad_options_are_one_line_errors_naming_the_key(section, message):
    with pytest.raises(ConfigError) as error:
        EvalConfig.parse("x", {"data": CSV, "pp": "", **section})
    assert message in str(error.value) and "\n" not in str(error.value)


def test_mask_key_is_the_input_pipelines():
    from siglip_jax.data.input import MASK_KEY

    assert common.MASK_KEY == MASK_KEY


def test_the_schema_and_evaluator_options_load_without_tensorflow():
    """An entry point imports schema before it quiets TensorFlow's start-up notices, so the
    evaluator modules schema reads options from must not load TensorFlow."""
    code = ("import sys, siglip_jax.schema, siglip_jax.evaluators.config; "
            "print('tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": REPO})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_the_evaluator_doc_names_no_removed_schema_names():
    for name in ("configs.md", "evaluation.md"):
        assert not re.search(r"EVAL_TYPE_KEYS|check_options", _doc(name)), name
