"""Acceptance 1: extension points are registries.

Written to tmp_path: a new connector (one .py in a temp package + one YAML in a temp config
dir), a new scorer (one class in one file of a temp package), and a new LLM preset (one YAML,
a tiny random-init Llama) with a new chat template (one file of the temp package). The
parametrised tests of tests/test_connectors.py, tests/test_scorers.py and tests/test_templates.py
enumerate them from the registries (Hydra's `connector` / `llm` groups on `hydra.searchpath`,
the scorer registry via $VLMLAB_SCORERS, the template registry via $VLMLAB_TEMPLATES) and pass
on them, with no edit anywhere else: the preset composes, tokenises in its template and trains.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import test_connectors as connectors_tests
from tests import test_hf_llava as hf_llava_tests
from tests import test_scorers as scorers_tests
from tests import test_templates as templates_tests
from vlmlab.errors import ConfigError
from vlmlab.eval import scorers
from vlmlab.eval.scorers import base as scorer_base
from vlmlab.models.llm import build_tokenizer
from vlmlab.text import templates
from vlmlab.text.templates import base as template_base

PACKAGE = "vlmlab_ext_pkg"

GATED = '''
"""A gated linear connector: Linear, then a learned scalar gate (tanh), as Flamingo gates."""

import torch
from torch import nn


class GatedLinearConnector(nn.Module):
    def __init__(self, in_features: int, out_features: int, gate_init: float = 0.5) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, out_features)
        self.gate = nn.Parameter(torch.tensor(float(gate_init)))

    @classmethod
    def expected_num_parameters(cls, in_features, out_features, gate_init=0.5):
        return in_features * out_features + out_features + {extra}

    def num_tokens(self, num_input_tokens: int) -> int:
        return num_input_tokens

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.gate) * self.proj(features)
'''

GATED_YAML = f"""# a connector from outside the package
_target_: {PACKAGE}.gated.GatedLinearConnector
gate_init: 0.5
init_seed: 0
"""

CONTAINS = '''
"""`type: contains`: right when any answer appears in the prediction (a lenient VQA reading)."""

from vlmlab.eval.scorers import Query, Scorer, normalize_exact


class ContainsScorer(Scorer):
    name = "contains"
    prompt = None
    example = {"question": "What is shown?", "answers": ["red circle"]}
    example_right, example_wrong = "I see a red circle.", "a blue square"

    def score(self, query: Query, prediction: str) -> float:
        text = f" {normalize_exact(prediction)} "
        return float(any(f" {normalize_exact(a)} " in text for a in query.item.answers))
'''


ZEPHYR = '''
"""`zephyr`: Zephyr-style chat (HuggingFaceH4/zephyr-7b-beta): `<|user|>\\nq</s>\\n<|assistant|>\\na</s>\\n`."""

from vlmlab.text.templates import Segment, Template, Turn, register


@register
class ZephyrTemplate(Template):
    name = "zephyr"
    uses_eos = True
    eos = "</s>"

    def __init__(self, eos=None):
        super().__init__(eos)
        self.eot = self.eos

    def render(self, turns: list[Turn]) -> list[Segment]:
        segments: list[Segment] = []
        for turn in turns:
            if turn.role == "human":
                segments.append((f"<|user|>\\n{turn.text}{self.eos}\\n<|assistant|>\\n", False))
            else:
                segments += [(turn.text + self.eos, True), ("\\n", False)]
        return segments
'''

TINY_ZEPHYR_YAML = """# a random-init Llama (2 layers, width 64) with the bundled tokenizer, in the zephyr template
name_or_path: null
pretrained: false
dtype: float32
init_seed: 0
attn_implementation: null
template: zephyr
warmup_stage: null
config:
  model_type: llama
  hidden_size: 64
  intermediate_size: 192
  num_hidden_layers: 2
  num_attention_heads: 4
  num_key_value_heads: 2
  max_position_embeddings: 512
  rms_norm_eps: 1.0e-06
  tie_word_embeddings: false
  vocab_size: null
tokenizer:
  name_or_path: pkg://tiny_tokenizer
"""


@pytest.fixture
def extension(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A temp package on sys.path and a temp config dir; the registries restored afterwards."""
    root = tmp_path / "ext"
    (root / PACKAGE).mkdir(parents=True)
    (root / PACKAGE / "__init__.py").write_text("")
    (root / "conf" / "connector").mkdir(parents=True)
    (root / "conf" / "llm").mkdir(parents=True)
    monkeypatch.syspath_prepend(str(root))
    saved = dict(scorer_base.SCORERS._classes)
    saved_templates = dict(template_base.TEMPLATES._classes)
    yield root
    scorer_base.SCORERS._classes.clear()
    scorer_base.SCORERS._classes.update(saved)
    template_base.TEMPLATES._classes.clear()
    template_base.TEMPLATES._classes.update(saved_templates)
    for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
        del sys.modules[name]


def _write_connector(root: Path, extra_parameters: int = 1) -> Path:
    (root / PACKAGE / "gated.py").write_text(textwrap.dedent(GATED.format(extra=extra_parameters)))
    (root / "conf" / "connector" / "gated.yaml").write_text(GATED_YAML)
    return root / "conf"


def test_a_new_connector_is_picked_up_by_the_connector_tests(extension: Path, compose_cfg) -> None:
    conf = _write_connector(extension)
    assert "gated" not in connectors_tests.OPTIONS  # conf/ alone does not have it
    assert "gated" in connectors_tests.connector_options(conf)  # Hydra's group, search path on
    with_ext = connectors_tests.SearchPathCompose(compose_cfg, conf)
    # the parametrised connector tests, run on the new option (composed + built via build_vlm)
    connectors_tests.test_every_option_names_a_connector_with_a_size_formula(with_ext, "gated")
    connectors_tests.test_shape_tokens_and_gradients(with_ext, "gated")
    connectors_tests.test_vlm_forward_gives_finite_loss(with_ext, "gated")
    connectors_tests.test_shipped_size_matches_its_class_formula(with_ext, "gated")
    connectors_tests.test_built_connector_size_matches_formula(with_ext, "gated")


def test_a_new_connector_with_a_wrong_formula_fails_the_size_tests(
    extension: Path, compose_cfg
) -> None:
    """The enumeration is not a formality: a formula off by one is caught on the new option."""
    conf = _write_connector(extension, extra_parameters=2)
    with_ext = connectors_tests.SearchPathCompose(compose_cfg, conf)
    with pytest.raises(AssertionError):
        connectors_tests.test_shipped_size_matches_its_class_formula(with_ext, "gated")
    with pytest.raises(AssertionError):
        connectors_tests.test_built_connector_size_matches_formula(with_ext, "gated")


def test_a_new_scorer_is_registered_and_scored_by_the_runner(
    extension: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (extension / PACKAGE / "contains.py").write_text(textwrap.dedent(CONTAINS))
    assert "contains" not in scorers.registered()
    monkeypatch.setenv(scorers.ENV_MODULES, f"{PACKAGE}.contains")
    assert "contains" in scorers.registered()
    # the registry-parametrised scorer test, on the new type: read, prompt, score, summarise
    scorers_tests.test_every_scorer_scores_its_example_through_the_runner("contains", tmp_path)
    scorers_tests.test_an_unknown_type_is_rejected_listing_every_registered_type(tmp_path)
    bench = tmp_path / "unknown.jsonl"
    bench.write_text('{"id": "a", "question": "Q", "answer": "x", "type": "essay"}\n')
    from vlmlab.eval.runner import read_benchmark

    _, rejected = read_benchmark(bench)
    assert "contains" in rejected[0]["reason"]  # the unknown-type error lists the new type


def test_an_unimportable_scorer_module_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from vlmlab.errors import ConfigError

    monkeypatch.setenv(scorers.ENV_MODULES, "no_such_scorer_module_xyz")
    with pytest.raises(ConfigError, match=r"VLMLAB_SCORERS.*no_such_scorer_module_xyz") as info:
        scorers.discover()
    assert info.value.key == scorers.ENV_MODULES


def test_a_new_llm_preset_and_chat_template_are_picked_up_by_the_template_tests(
    extension: Path, monkeypatch: pytest.MonkeyPatch, compose_cfg
) -> None:
    (extension / PACKAGE / "zephyr.py").write_text(textwrap.dedent(ZEPHYR))
    (extension / "conf" / "llm" / "tiny_zephyr.yaml").write_text(TINY_ZEPHYR_YAML)
    conf = extension / "conf"
    assert "zephyr" not in templates.available_templates()
    assert "tiny_zephyr" not in templates_tests.LLM_OPTIONS  # conf/ alone does not have it
    monkeypatch.setenv(templates.ENV_MODULES, f"{PACKAGE}.zephyr")
    assert "zephyr" in templates.available_templates()
    assert "tiny_zephyr" in templates_tests.llm_options(conf)  # Hydra's group, search path on
    # the registry-parametrised template tests, on the new template
    templates_tests.test_only_replies_are_rendered_as_targets("zephyr")
    for has_image in (True, False):
        templates_tests.test_every_template_masks_all_but_the_replies("zephyr", has_image)
    templates_tests.test_prompt_is_the_training_text_up_to_the_assistant_cue({}, "zephyr")
    templates_tests.test_unknown_template_names_the_key_and_every_registered_name()
    tiny_tokenizer = build_tokenizer({"name_or_path": "pkg://tiny_tokenizer"})
    hf_llava_tests.test_chat_template_matches_our_template("zephyr", tiny_tokenizer)  # export
    # the llm-group-parametrised preset tests, on the new preset: compose, BOS, tokenise, train
    with_ext = connectors_tests.SearchPathCompose(compose_cfg, conf)
    assert with_ext("llm=tiny_zephyr", "stage=2").stage.template == "zephyr"
    templates_tests.test_preset_tokenizer_bos_agrees_with_its_template(with_ext, "tiny_zephyr")
    templates_tests.test_random_init_preset_trains_with_its_template(with_ext, "tiny_zephyr")


def test_a_new_template_that_masks_wrongly_fails_the_template_tests(
    extension: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The enumeration is not a formality: a template whose reply is not a target is caught."""
    wrong = ZEPHYR.replace("(turn.text + self.eos, True)", "(turn.text + self.eos, False)")
    (extension / PACKAGE / "zephyr.py").write_text(textwrap.dedent(wrong))
    monkeypatch.setenv(templates.ENV_MODULES, f"{PACKAGE}.zephyr")
    with pytest.raises(AssertionError):
        templates_tests.test_only_replies_are_rendered_as_targets("zephyr")
    with pytest.raises(AssertionError):
        templates_tests.test_prompt_is_the_training_text_up_to_the_assistant_cue({}, "zephyr")


def test_an_unimportable_template_module_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(templates.ENV_MODULES, "no_such_template_module_xyz")
    with pytest.raises(ConfigError, match=r"VLMLAB_TEMPLATES.*no_such_template_module_xyz") as info:
        templates.get_template("vicuna_v1")
    assert info.value.key == templates.ENV_MODULES
