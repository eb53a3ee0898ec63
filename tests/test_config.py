import json
import os
from pathlib import Path

import pytest
import yaml

from menseg.config import (
    PACKAGED_CONFIGS,
    Config,
    flat_config,
    load_config,
    packaged_config_names,
    parse_overrides,
    save_config,
    to_dict,
    with_overrides,
)
from menseg.errors import MensegError


def test_packaged_configs_load():
    names = packaged_config_names()
    assert {"baseline", "demo", "ism", "sim2real", "sim2real/s2r-raw"} <= set(names)
    for n in names:
        cfg = load_config(n)
        assert isinstance(cfg, Config)
        assert cfg.name == n.split("/")[-1]


# ---------------------------------------------------------------- variants as diffs


def test_base_merges_recursively_lists_replace_and_chains(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("base: baseline\nname: a\ntrain: {steps: 7, patch_size: [32, 32, 32]}\n"
                                     "ism: {spatial: {enabled: true, sources: [batch]}}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.yaml").write_text("base: ../a.yaml\nname: b\ntrain: {patch_size: [16, 16, 16]}\n"
                                             "ism: {spatial: {p: 0.25}}\n")
    b = load_config(tmp_path / "sub" / "b.yaml", ["train.seed=3"])
    base = load_config("baseline")
    assert b.name == "b" and b.train.steps == 7 and b.train.patch_size == (16, 16, 16)  # dicts merge
    assert b.train.seed == 3 and b.train.lr == base.train.lr and b.model == base.model
    assert b.ism.spatial.enabled and b.ism.spatial.p == 0.25 and b.ism.spatial.sources == ("batch",)
    (tmp_path / "c.yaml").write_text("base: ism\nism: {spatial: {sources: [location]}}\n")
    assert load_config(tmp_path / "c.yaml").ism.spatial.sources == ("location",)  # lists replace


@pytest.mark.parametrize("files, fragment", [
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "base: a.yaml\n"}, "cycle"),
    ({"a.yaml": "base: a.yaml\n"}, "cycle"),
    ({"a.yaml": "base: nope\n"}, "'nope' is not a packaged config"),
    ({"a.yaml": "base: gone.yaml\n"}, "base config file not found"),
    ({"a.yaml": "base: [baseline]\n"}, "'base' must name"),
    ({"a.yaml": "base: baseline\ntrain: {stepz: 3}\n"}, "unknown config key 'train.stepz'"),
])
def test_bad_bases_are_refused_in_one_line(tmp_path: Path, files: dict, fragment: str) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(MensegError, match=fragment) as e:
        load_config(tmp_path / "a.yaml")
    assert "\n" not in str(e.value)


def _yaml_lines(path: Path) -> dict[str, int]:
    """Dotted key -> 0-based line of every key in a YAML file."""
    out: dict[str, int] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                out[prefix + k.value] = k.start_mark.line
                walk(v, f"{prefix}{k.value}.")

    walk(yaml.compose(path.read_text()), "")
    return out


@pytest.mark.parametrize("name", packaged_config_names())
def test_packaged_values_that_differ_from_the_defaults_say_why(name: str) -> None:
    """Every value a packaged YAML sets that differs from the dataclass default carries a comment (on its
    line or the line above); only names and ``enabled`` switches are explained by the file's header."""
    defaults = flat_config(to_dict(Config()))
    path, missing = PACKAGED_CONFIGS / f"{name}.yaml", []
    while True:
        raw = yaml.safe_load(path.read_text())
        text = path.read_text().splitlines()
        lines = _yaml_lines(path)
        for key, value in flat_config({k: v for k, v in raw.items() if k != "base"}).items():
            if key in ("name", "out_dir") or key.endswith(".enabled"):
                continue
            if key not in defaults:
                missing.append(f"{path.name}: {key} is not a config key")
                continue
            default = defaults[key]
            if value == default or (isinstance(default, float) and value == float(default)):
                continue
            i = lines[key]
            if "#" not in text[i] and not (i > 0 and text[i - 1].lstrip().startswith("#")):
                missing.append(f"{path.name}: {key}: {value!r} (default {default!r}) without a comment")
        if "base" not in raw:
            break
        base = raw["base"]
        path = (path.parent / base) if base.endswith(".yaml") else PACKAGED_CONFIGS / f"{base}.yaml"
    assert not missing, missing


@pytest.mark.parametrize("name", [n for n in packaged_config_names() if n != "baseline"])
def test_variants_are_short_diffs(name: str) -> None:
    raw = yaml.safe_load((PACKAGED_CONFIGS / f"{name}.yaml").read_text())
    assert "base" in raw
    assert len(flat_config({k: v for k, v in raw.items() if k != "base"})) <= 12


def test_every_packaged_config_and_the_review_pages_ship_in_the_wheel(tmp_path: Path) -> None:
    """Build the wheel from a copy of the sources, install it into a folder, and load every packaged
    config from the installed package (not from the source tree)."""
    import shutil
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    shutil.copytree(root / "src", src / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(root / f, src / f)
    run = dict(capture_output=True, text=True, timeout=300)
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path / "dist"), str(src)], **run)
    assert res.returncode == 0, res.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("menseg-*.whl"))
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                          str(tmp_path / "site"), str(wheel)], **run)
    assert res.returncode == 0, res.stderr[-2000:]
    code = ("import menseg, json; from menseg.config import load_config, packaged_config_names;"
            "names = packaged_config_names();"
            "from menseg.review.site import static_root;"
            "root = static_root();"
            "pages = sorted(str(p.relative_to(root)) for p in root.rglob('*') if p.is_file());"
            "from menseg.sim2real.stream import resolve_mapping;"
            "mapping = len(resolve_mapping('synthseg'));"
            "loaded = [load_config(n).name for n in names];"
            "print(json.dumps([menseg.__file__, names, loaded, pages, mapping]))")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, **run)
    assert res.returncode == 0, res.stderr[-2000:]
    where, names, loaded, pages, mapping = json.loads(res.stdout)
    assert mapping > 100  # the packaged label mapping of the stream's label maps
    assert where.startswith(str(tmp_path / "site"))
    assert names == packaged_config_names()  # every packaged config, subfolders included
    assert loaded == [n.split("/")[-1] for n in names]
    # the review pages and the vendored viewer with its licences ship too
    assert {"index.html", "case.html", "review.js", "review.css", "vendor/niivue.umd.js",
            "vendor/niivue.json", "vendor/LICENSE-niivue.txt", "vendor/THIRD_PARTY_NOTICES.txt"} <= set(pages)


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
    assert with_overrides(cfg, ["train.seed=5"]).train.seed == 5
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
