"""Configuration errors name the file and the offending key."""

import pytest

from fedsilo.common.clitools import table
from fedsilo.common.config import Timeouts, read_toml, validate, write_toml
from fedsilo.common.errors import ConfigError


def test_timeouts_ordering_enforced():
    with pytest.raises(ValueError, match="round"):
        Timeouts(round=10, transfer=60)


def test_validate_names_the_key(tmp_path):
    with pytest.raises(ConfigError) as info:
        validate(Timeouts, {"request": -1}, "node.toml")
    assert "node.toml" in str(info.value) and "'request'" in str(info.value)
    with pytest.raises(ConfigError, match="'bogus'"):
        validate(Timeouts, {"bogus": 1}, "node.toml")


def test_toml_round_trip_and_errors(tmp_path):
    path = tmp_path / "c.toml"
    write_toml(path, {"node": {"name": "a", "skip": None}, "limits": {"max_epochs": 3}})
    assert read_toml(path) == {"node": {"name": "a"}, "limits": {"max_epochs": 3}}
    path.write_text("this is = = not toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        read_toml(path)
    with pytest.raises(ConfigError, match="not found"):
        read_toml(tmp_path / "missing.toml")


def test_table_aligns_and_handles_empty():
    out = table(["name", "tags"], [["a", ["x", "y"]], ["longer-name", None]])
    lines = out.splitlines()
    assert lines[0].startswith("name") and "x,y" in lines[2] and lines[3].endswith("-")
    assert "(none)" in table(["a"], [])


@pytest.mark.parametrize("value", [-1, -20, 20, 2**40, float("nan"), "10; renice -20", None])
def test_worker_nice_outside_0_to_19_is_refused_by_name(value):
    """`[node] worker_nice` is a niceness the worker can set without privilege: never below the daemon's (negative),
    never past 19, never anything but an integer."""
    from fedsilo.node.config import NodeSection

    section = {"name": "n1", "node_id": "n1", "worker_nice": value}
    with pytest.raises(ConfigError, match="'worker_nice'"):
        validate(NodeSection, section, "node.toml")
    assert validate(NodeSection, {**section, "worker_nice": 19}, "node.toml").worker_nice == 19
