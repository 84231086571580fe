"""One declaration of the training settings (lesion_tasks.model.config.KNOBS), three surfaces: the
lesion_retrain form, the `lesion train` options and the bounds every value is checked against agree."""

from __future__ import annotations

import argparse
from dataclasses import asdict, fields
from pathlib import Path

import pytest

from lesion_tasks import cli
from lesion_tasks.model import config
from lesion_tasks.model.backbones import BACKBONES

DAGS = Path(__file__).resolve().parents[2] / "dags"


@pytest.fixture(scope="module")
def form(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS)).get_dag("lesion_retrain").params


def _train_options() -> dict[str, argparse.Action]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    return {a.dest: a for a in sub._actions if a.option_strings and a.dest not in ("help",)}


def test_the_form_is_the_declaration(form):
    assert set(form) == set(config.PARAM_KEYS)
    demo = asdict(config.PROFILES["demo"])
    for name in form:
        schema, knob = form.get_param(name).schema, config.KNOB[name]
        assert form[name] == demo[name], name
        assert schema["type"] == {int: "integer", float: "number", str: "string"}[knob.kind], name
        if name in config.BOUNDS:
            assert (schema["minimum"], schema["maximum"]) == config.BOUNDS[name][1:], name
        assert form.get_param(name).description.startswith(knob.description), name
    assert set(form.get_param("backbone").schema["examples"]) == set(BACKBONES) - {"tiny"}


def test_the_cli_is_the_declaration():
    options = _train_options()
    assert set(options) - {"json", "verbose"} == set(config.CLI_KEYS)
    for name in config.CLI_KEYS:
        knob = config.KNOB[name]
        assert options[name].option_strings == [knob.option], name
        assert (options[name].type or str) is knob.kind, name
    assert config.config_from_cli(cli.build_parser().parse_args(["train"])) == config.PROFILES["demo"]
    paper = config.config_from_cli(cli.build_parser().parse_args(["train", "--profile", "paper", "--epochs", "7"]))
    assert (paper.backbone, paper.epochs) == ("resnet101v2", 7)


@pytest.mark.parametrize("name", sorted(config.BOUNDS))
def test_every_surface_refuses_the_same_out_of_range_value(name, form):
    kind, low, high = config.BOUNDS[name]
    bad = high + (1 if kind is int else 0.5)
    with pytest.raises(ValueError, match=f"{name}={bad!r} is out of range: expected {low} to {high}"):
        config.make_config("demo", **{name: bad})
    if name in config.CLI_KEYS:
        args = cli.build_parser().parse_args(["train", config.KNOB[name].option, str(bad)])
        with pytest.raises(ValueError, match=f"{name}="):
            config.config_from_cli(args)
    if name in config.PARAM_KEYS:
        with pytest.raises(ValueError, match=f"{name}="):
            config.config_from_params({name: bad})


def test_a_knob_is_declared_once():
    """Every TrainConfig field is a knob, but for the three that are set only by code and tests."""
    assert {f.name for f in fields(config.TrainConfig)} - set(config.KNOB) == {"color_constancy",
                                                                                "random_init_fallback", "floors"}
    assert set(config.FORM_BACKBONES) == set(BACKBONES) - {"tiny"}
    assert config.FORM_BACKBONES[0] == config.PROFILES["demo"].backbone
