from pathlib import Path

import pytest
import yaml

from menseg.config import (
    PACKAGED_CONFIGS,
    Config,
    load_config,
    parse_overrides,
    replace,
    save_config,
    to_dict,
)
from menseg.errors import MensegError


def test_packaged_configs_load():
    names = sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml"))
    assert "baseline" in names and "demo" in names
    for n in names:
        cfg = load_config(n)
        assert isinstance(cfg, Config)
        assert cfg.name == n


def test_overrides_types_and_shorthand(tmp_path: Path):
    cfg = load_config("baseline", ["data=/some/dir", "train.steps=7", "train.patch_size=[32,32,16]",
                                    "model.deep_supervision=false", "infer.overlap=0.25"])
    assert cfg.data.root == "/some/dir"
    assert cfg.train.steps == 7
    assert cfg.train.patch_size == (32, 32, 16)
    assert cfg.model.deep_supervision is False
    assert cfg.infer.overlap == 0.25
    # int given to a float field is accepted and converted
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0


@pytest.mark.parametrize(
    "bad, fragment",
    [
        (["train.stepz=3"], "unknown config key 'train.stepz'"),
        (["train.steps=abc"], "must be an integer"),
        (["train.patch_size=[1,2]"], "needs 3 values"),
        (["train.patch_size=[16,16,a]"], "config key 'train.patch_size[2]' must be an integer"),
        (["train.steps=1.5"], "must be an integer"),
        (["nonsense"], "key=value"),
        (["model.deep_supervision=3"], "true or false"),
    ],
)
def test_bad_overrides_are_clear(bad, fragment):
    with pytest.raises(MensegError, match=fragment.replace("[", r"\[")):
        load_config("baseline", bad)


def test_roundtrip_save_load(tmp_path: Path):
    cfg = load_config("demo", ["train.steps=11"])
    p = tmp_path / "c.yaml"
    save_config(cfg, p)
    assert yaml.safe_load(p.read_text())["train"]["steps"] == 11
    assert load_config(p) == cfg
    assert replace(cfg, ["train.seed=5"]).train.seed == 5
    assert to_dict(cfg)["train"]["patch_size"] == list(cfg.train.patch_size)


def test_missing_config_names_packaged():
    with pytest.raises(MensegError, match="packaged: .*baseline"):
        load_config("does-not-exist")


def test_parse_overrides_nested():
    assert parse_overrides(["a.b.c=1", "a.b.d=x"]) == {"a": {"b": {"c": 1, "d": "x"}}}


def test_one_parser_for_configs_and_synth_records():
    """config.from_dict parses run configs and (through synth.serial) the synthetic engine's records."""
    from dataclasses import dataclass, field
    from typing import Literal

    from menseg.config import from_dict
    from menseg.synth.serial import from_dict as synth_from_dict

    @dataclass(frozen=True)
    class Inner:
        n: int = 1

    @dataclass(frozen=True)
    class Rec:
        mode: Literal["a", "b"] = "a"
        sizes: list[int] = field(default_factory=list)
        table: dict[str, tuple[float, ...]] = field(default_factory=dict)
        inner: Inner = Inner()
        name: str | None = None

    r = from_dict(Rec, {"mode": "b", "sizes": [1, 2.0], "table": {"x": [1, 2]}, "inner": {"n": 3.0},
                        "name": 7})
    assert r == Rec("b", [1, 2], {"x": (1.0, 2.0)}, Inner(3), "7")
    assert isinstance(r.inner.n, int) and from_dict(Rec, r) is r
    with pytest.raises(MensegError, match="config key 'mode' must be one of 'a', 'b'"):
        from_dict(Rec, {"mode": "c"})
    with pytest.raises(MensegError, match=r"key 'Rec.sizes\[1\]' must be an integer"):
        synth_from_dict(Rec, {"sizes": [1, "x"]})
    with pytest.raises(MensegError, match="unknown keys 'Rec.p', 'Rec.q'"):
        synth_from_dict(Rec, {"p": 1, "q": 2})
    with pytest.raises(MensegError, match="key 'Rec.inner' must be a mapping"):
        synth_from_dict(Rec, {"inner": 3})
