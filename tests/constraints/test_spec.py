"""The constraint language: dict / JSON / TOML shape, round trips, errors naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from genrerank.constraints import (
    ConstraintSet,
    ConstraintSpecError,
    Quota,
    Spacing,
    constraints_from_config,
    load_constraints,
)

EXAMPLE = {"quotas": [{"attribute": "category", "value": 3, "max": 2, "within": 6},
                      {"attribute": "cold_start", "min": 1}],
           "max_per_creator": 2, "required": ["v1"], "forbidden": ["v9"],
           "spacing": [{"attribute": "category", "distance": 2}]}


def test_the_documented_example_parses_and_round_trips() -> None:
    cs = ConstraintSet.from_dict(EXAMPLE)
    assert cs == ConstraintSet(
        quotas=(Quota("category", 3, max=2, within=6), Quota("cold_start", min=1)),
        max_per_creator=2, required=("v1",), forbidden=("v9",),
        spacing=(Spacing("category", 2),))
    assert cs.to_dict() == EXAMPLE
    assert ConstraintSet.from_dict(json.loads(json.dumps(cs.to_dict()))) == cs
    assert hash(cs) == hash(ConstraintSet.from_dict(EXAMPLE))  # frozen, usable as a key
    assert not cs.is_empty()
    assert cs.attributes() == {"category", "cold_start", "creator"}


@pytest.mark.parametrize(("d", "empty"), [
    ({}, True), (None, True),
    ({"quotas": [{"attribute": "long_tail"}]}, True),  # no bound: constrains nothing
    ({"spacing": [{"attribute": "creator", "distance": 1}]}, True),
    ({"quotas": [{"attribute": "long_tail", "max": 0}]}, False),
    ({"forbidden": ["a"]}, False),
])
def test_is_empty_means_no_list_can_break_the_set(d: dict | None, empty: bool) -> None:
    assert ConstraintSet.from_dict(d).is_empty() is empty


@pytest.mark.parametrize(("d", "field", "words"), [
    ({"quota": []}, "quota", "unknown key"),
    ({"quotas": [{"attribute": "colour", "value": 1}]}, "quotas[0].attribute", "must be one of"),
    ({"quotas": [{"value": 1}]}, "quotas[0].attribute", "missing"),
    ({"quotas": [{"attribute": "category"}]}, "quotas[0].value", "needs the index"),
    ({"quotas": [{"attribute": "cold_start", "value": 1}]}, "quotas[0].value", "is a flag"),
    ({"quotas": [{"attribute": "category", "value": 1, "min": -1}]}, "quotas[0].min", ">= 0"),
    ({"quotas": [{"attribute": "category", "value": 1, "min": 3, "max": 2}]},
     "quotas[0].max", "below min"),
    ({"quotas": [{"attribute": "category", "value": 1, "within": 0}]}, "quotas[0].within",
     ">= 1"),
    ({"quotas": [{"attribute": "category", "value": True}]}, "quotas[0].value", "integer"),
    ({"quotas": [{"attribute": "category", "value": 1, "max": 2.5}]}, "quotas[0].max",
     "integer"),
    ({"quotas": [{"attribute": "category", "value": 1, "extra": 1}]}, "quotas[0].extra",
     "unknown key"),
    ({"quotas": {"attribute": "category"}}, "quotas", "list"),
    ({"max_per_creator": 0}, "max_per_creator", ">= 1"),
    ({"required": "v1"}, "required", "list of item ids"),
    ({"forbidden": ["ok", 7]}, "forbidden[1]", "non-empty string"),
    ({"spacing": [{"attribute": "cold_start", "distance": 2}]}, "spacing[0].attribute",
     "must be one of"),
    ({"spacing": [{"attribute": "category"}]}, "spacing[0].distance", "missing"),
    ({"spacing": [{"attribute": "category", "distance": 0}]}, "spacing[0].distance", ">= 1"),
])
def test_a_bad_key_is_one_line_naming_it(d: dict, field: str, words: str) -> None:
    with pytest.raises(ConstraintSpecError) as info:
        ConstraintSet.from_dict(d)
    assert info.value.field == field
    assert words in info.value.message
    assert str(info.value).startswith(f"{field}: ") and "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_python_construction_is_checked_too() -> None:
    with pytest.raises(ValueError, match="attribute"):
        Quota("colour", 1)
    with pytest.raises(ValueError, match="distance"):
        Spacing("creator", 0)
    cs = ConstraintSet(quotas=[Quota("creator", 2, max=1)], required=["a"])  # lists accepted
    assert cs.quotas == (Quota("creator", 2, max=1),) and cs.required == ("a",)


def test_files_json_and_toml(tmp_path: Path) -> None:
    (tmp_path / "c.json").write_text(json.dumps(EXAMPLE))
    (tmp_path / "c.toml").write_text(
        'max_per_creator = 2\nrequired = ["v1"]\nforbidden = ["v9"]\n'
        '[[quotas]]\nattribute = "category"\nvalue = 3\nmax = 2\nwithin = 6\n'
        '[[quotas]]\nattribute = "cold_start"\nmin = 1\n'
        '[[spacing]]\nattribute = "category"\ndistance = 2\n')
    assert load_constraints(tmp_path / "c.json") == load_constraints(tmp_path / "c.toml")
    (tmp_path / "bad.json").write_text('{"quotas": [{"attribute": "x"}]}')
    with pytest.raises(ValueError, match=r"bad\.json: quotas\[0\]\.attribute"):
        load_constraints(tmp_path / "bad.json")
    (tmp_path / "broken.toml").write_text("quotas = [")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_constraints(tmp_path / "broken.toml")
    with pytest.raises(ValueError, match=".json or .toml"):
        load_constraints(tmp_path / "c.txt") if (tmp_path / "c.txt").write_text("{}") else None
    with pytest.raises(FileNotFoundError):
        load_constraints(tmp_path / "missing.json")


def test_run_config_default_constraints() -> None:
    assert constraints_from_config({"name": "greedy"}) is None
    assert constraints_from_config({"name": "greedy", "constraints": {}}) is None
    cs = constraints_from_config({"name": "greedy", "constraints": EXAMPLE})
    assert cs == ConstraintSet.from_dict(EXAMPLE)
    with pytest.raises(ValueError, match=r"decode\.constraints\.max_per_creator"):
        constraints_from_config({"constraints": {"max_per_creator": -1}})
