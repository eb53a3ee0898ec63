"""Named models (``menseg.models``): export, list, checksums, the default model, ``model.init`` fine-tuning
(layer check, ISM from plain), warm-up and the frozen encoder."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from menseg import models
from menseg.checkpoint import load_checkpoint, save_checkpoint
from menseg.config import Config, from_dict, load_config, to_dict
from menseg.data.phantom import make_phantom_case, write_phantom_dataset
from menseg.errors import MensegError
from menseg.infer.predict import predict, sidecar_path
from menseg.models import export_model, find_model, init_weights, list_models, resolve_model
from menseg.nets import build_network, build_run_network, encoder_parameters
from menseg.train.trainer import lr_at, train

TINY = {"seqdrop": {"enabled": False}, "model": {"filters": [4, 8, 16], "deep_supr_num": 1},
        "train": {"patch_size": [16, 16, 16]}, "infer": {"overlap": 0.25, "min_component_mm3": 0.0}}


def _tiny(**extra: dict) -> Config:
    d = {k: dict(v) for k, v in TINY.items()}
    for k, v in extra.items():
        d.setdefault(k, {}).update(v)
    return from_dict(Config, d)


def _checkpoint(path: Path, cfg: Config, seed: int = 0) -> Path:
    from menseg.ism.model import build_model

    torch.manual_seed(seed)
    net = build_model(cfg)
    save_checkpoint(path, {"model": net.state_dict(), "config": to_dict(cfg), "step": 7,
                           "optimizer": {"state": {}, "param_groups": []}, "train_cases": ["A", "B"]})
    return path


def _case(root: Path) -> Path:
    image, _, affine = make_phantom_case((16, 16, 16), (1.0, 1.0, 1.0), np.random.default_rng(0))
    folder = root / "S"
    folder.mkdir(parents=True)
    for c, m in enumerate(("t1c", "t1n", "t2f", "t2w")):
        nib.save(nib.Nifti1Image(image[c], affine), str(folder / f"S-{m}.nii.gz"))
    return folder


@pytest.fixture()
def library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder of exported models on MENSEG_MODELS_DIR, and no shipped model (an empty package folder)."""
    monkeypatch.setattr(models, "SHIPPED_DIR", tmp_path / "shipped")
    (tmp_path / "shipped").mkdir()
    lib = tmp_path / "lib"
    ckpt = _checkpoint(tmp_path / "run" / "best.pt", _tiny())
    export_model(ckpt.parent, "tiny", lib, summary="a tiny test model")
    monkeypatch.setenv(models.MODELS_ENV, str(lib))
    return lib


def test_export_keeps_weights_config_and_rules_only(tmp_path: Path) -> None:
    cfg = _tiny()
    ckpt = _checkpoint(tmp_path / "run" / "latest.pt", cfg)
    state = load_checkpoint(ckpt)
    full = export_model(ckpt, "full", tmp_path / "lib")
    half = export_model(ckpt, "half", tmp_path / "lib", half=True, summary="fp16")
    kept = torch.load(full.weights, weights_only=True)
    assert set(kept) == {"format", "model", "config", "step", "postprocess"}  # no optimiser state
    assert kept["config"] == state["config"] and kept["step"] == 7
    for k, v in state["model"].items():
        assert torch.equal(kept["model"][k], v)
        assert torch.load(half.weights, weights_only=True)["model"][k].dtype == (
            torch.float16 if v.is_floating_point() else v.dtype)
    assert half.bytes < 0.6 * full.bytes
    card = full.card.read_text()
    assert "filters [4, 8, 16]" in card and "Training cases: 2" in card and "must not be used for" in card
    manifest = json.loads((tmp_path / "lib" / "half.json").read_text())
    assert manifest["summary"] == "fp16" and manifest["bytes"] == half.weights.stat().st_size
    with pytest.raises(MensegError, match="a model called 'full' is already there; use --overwrite"):
        export_model(ckpt, "full", tmp_path / "lib")
    with pytest.raises(MensegError, match="model name 'a/b' must be letters"):
        export_model(ckpt, "a/b", tmp_path / "lib")
    export_model(ckpt, "full", tmp_path / "lib", overwrite=True)


def test_predict_by_name_and_the_listing(library: Path, tmp_path: Path) -> None:
    (entry,) = list_models()
    assert (entry.name, entry.shipped, entry.summary) == ("tiny", False, "a tiny test model")
    folder = _case(tmp_path / "in")
    (label,) = predict("tiny", folder, tmp_path / "out.nii.gz", device="cpu", progress=False)
    assert json.loads(sidecar_path(label).read_text())["model"] == "tiny"
    with pytest.raises(MensegError, match=r"unknown model 'tyni' \(known models: tiny; or give a checkpoint"):
        resolve_model("tyni")
    with pytest.raises(MensegError, match="no/such.pt: checkpoint not found"):
        predict("no/such.pt", folder, tmp_path / "out2.nii.gz", device="cpu", progress=False)


def test_damaged_weights_fail_their_checksum(library: Path, tmp_path: Path) -> None:
    weights = library / "tiny.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(MensegError, match="model 'tiny' is damaged: its weights do not match the checksum"):
        find_model("tiny")
    with pytest.raises(MensegError, match="is damaged"):
        predict("tiny", _case(tmp_path / "in"), tmp_path / "o.nii.gz", device="cpu", progress=False)


def test_no_model_means_the_shipped_one(library: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(MensegError, match="no model given, and this menseg ships none yet"):
        resolve_model(None)
    export_model(library / "tiny.pt", "zero", models.SHIPPED_DIR, summary="shipped", default=True)
    with caplog.at_level(logging.INFO, logger="menseg.models"):
        path, label = resolve_model(None)
    assert (path, label) == (models.SHIPPED_DIR / "zero.pt", "zero")
    assert "using the shipped model zero (shipped)" in caplog.text
    assert [(e.name, e.shipped) for e in list_models()] == [("zero", True), ("tiny", False)]
    export_model(library / "tiny.pt", "tiny", models.SHIPPED_DIR)  # the package's copy wins over the folder's
    assert find_model("tiny").shipped


def _cli(*args: str, env_dir: Path, cwd: Path) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, models.MODELS_ENV: str(env_dir)}
    return subprocess.run([sys.executable, "-m", "menseg", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def test_cli_model_argument_forms(library: Path, tmp_path: Path) -> None:
    folder = _case(tmp_path / "in")
    run_dir = tmp_path / "run"  # holds best.pt: a model given as the first argument
    r = _cli("predict", str(run_dir), str(folder), str(tmp_path / "a.nii.gz"), "--device", "cpu",
             env_dir=library, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "a.json").read_text())["model"] == str(run_dir / "best.pt")
    r = _cli("predict", "--model", "tiny", str(folder), str(tmp_path / "b.nii.gz"), "--device", "cpu",
             env_dir=library, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = _cli("predict", "tiny", str(folder), str(tmp_path / "c.nii.gz"), "--device", "cpu",
             env_dir=library, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "c.json").read_text())["model"] == "tiny"
    # no model: this test's menseg package ships none (the subprocess sees the real package folder, which
    # holds none until one is shipped; then it is used)
    r = _cli("predict", str(folder), str(tmp_path / "d.nii.gz"), "--device", "cpu", env_dir=library,
             cwd=tmp_path)
    if list(Path(models.__file__).parent.glob("*.json")):
        assert r.returncode == 0 and "using the shipped model" in r.stderr
    else:
        assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
            "error: no model given, and this menseg ships none yet: give a checkpoint or run folder (menseg "
            "predict MODEL INPUT OUTPUT) or --model NAME|PATH")
    r = _cli("predict", "tyni", str(folder), str(tmp_path / "e.nii.gz"), env_dir=library, cwd=tmp_path)
    assert r.returncode == 2 and "unknown model 'tyni' (known models: tiny" in r.stderr
    r = _cli("models", "list", env_dir=library, cwd=tmp_path)
    assert r.returncode == 0 and "tiny" in r.stdout and "a tiny test model" in r.stdout
    r = _cli("models", "show", "tiny", env_dir=library, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("# tiny") and "checked" in r.stdout


def test_init_weights_checks_every_layer(tmp_path: Path) -> None:
    src = _checkpoint(tmp_path / "a.pt", _tiny(), seed=1)
    net = build_run_network(_tiny())
    init_weights(net, str(src))
    for k, v in load_checkpoint(src)["model"].items():
        assert torch.equal(net.state_dict()[k], v)
    wider = build_run_network(_tiny(model={"filters": [4, 8, 32]}))
    with pytest.raises(MensegError, match=r"model.init: this network differs from .*a.pt's at "
                                          r"bottleneck.conv1.conv.weight \(shape \(32, 8, 3, 3, 3\) in this "
                                          r"network, \(16, 8, 3, 3, 3\) in the init weights\)"):
        init_weights(wider, str(src))
    with_presence = _checkpoint(tmp_path / "p.pt", _tiny(seqdrop={"enabled": True}), seed=1)
    with pytest.raises(MensegError, match=r"at input_block.conv1.conv.weight \(not in the init weights\)"):
        init_weights(build_run_network(_tiny()), str(with_presence))


def test_a_presence_network_starts_as_the_plain_one_it_comes_from(tmp_path: Path) -> None:
    src = _checkpoint(tmp_path / "a.pt", _tiny(), seed=1)
    plain = build_run_network(_tiny())
    init_weights(plain, str(src))
    presence = build_run_network(_tiny(seqdrop={"enabled": True}))
    init_weights(presence, str(src))
    x = torch.randn(2, 4, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(plain.eval()(x), presence.eval()(x))  # zero weights on the presence channels
    # an ISM network (backbone under net.) too
    from menseg.ism.model import build_model

    ism = {"ism": {"spatial": {"enabled": True, "levels": [1]}}}
    src = _checkpoint(tmp_path / "ism.pt", _tiny(**ism), seed=2)
    ism_plain = build_model(_tiny(**ism))
    init_weights(ism_plain, str(src))
    ism_presence = build_model(_tiny(seqdrop={"enabled": True}, **ism))
    init_weights(ism_presence, str(src))
    with torch.no_grad():
        assert torch.equal(ism_plain.eval()(x), ism_presence.eval()(x))


def test_ism_network_starts_from_a_plain_one(tmp_path: Path) -> None:
    from menseg.ism.model import build_model

    src = _checkpoint(tmp_path / "a.pt", _tiny(), seed=1)
    ism = build_model(_tiny(ism={"spatial": {"enabled": True}}))
    fresh = {k: v.clone() for k, v in ism.state_dict().items() if not k.startswith("net.")}
    init_weights(ism, str(src))
    for k, v in load_checkpoint(src)["model"].items():
        assert torch.equal(ism.state_dict()[f"net.{k}"], v)
    assert fresh and all(torch.equal(ism.state_dict()[k], v) for k, v in fresh.items())


def test_encoder_parameters_are_the_encoders() -> None:
    net = build_network(_tiny().model, patch_size=(16, 16, 16))
    enc = {id(p) for p in encoder_parameters(net)}
    names = {n.split(".")[0] for n, p in net.named_parameters() if id(p) in enc}
    assert names == {"input_block", "downsamples", "bottleneck"}
    assert 0 < len(enc) < len(list(net.parameters()))


def test_warmup_then_poly() -> None:
    tc = _tiny(train={"lr": 0.01, "steps": 100, "warmup_steps": 4}).train
    assert [lr_at(tc, s) for s in range(4)] == pytest.approx([0.0025, 0.005, 0.0075, 0.01])
    assert lr_at(tc, 50) == pytest.approx(0.01 * 0.5**0.9)
    with pytest.raises(MensegError, match="warmup_steps and train.freeze_encoder_steps must be at least 0"):
        _tiny(train={"warmup_steps": -1})


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("phantoms")
    write_phantom_dataset(root / "data", n_cases=3, shape=(32, 32, 32), seed=1)
    return root


def _run_cfg(data: Path, out: Path, *extra: str) -> Config:
    return load_config(None, [
        f"data={data / 'data'}", f"data.cache_dir={data / 'cache'}", f"out_dir={out}",
        "model.filters=[4,8,16]", "train.patch_size=[16,16,16]", "train.batch_size=2", "train.steps=3",
        "train.val_every=3", "train.checkpoint_every=3", "seqdrop.enabled=false", "postprocess.learn=false",
        *extra])


def test_fine_tuning_run_starts_from_the_init_and_holds_the_encoder(phantoms: Path, tmp_path: Path) -> None:
    base = train(_run_cfg(phantoms, tmp_path / "base"), progress=False)
    init = load_checkpoint(base / "latest.pt")["model"]
    cfg = _run_cfg(phantoms, tmp_path / "ft", f"model.init={base}", "train.freeze_encoder_steps=3",
                   "train.warmup_steps=2")
    out = train(cfg, progress=False)
    after = load_checkpoint(out / "latest.pt")["model"]
    net = build_run_network(cfg)
    enc_names = {n for n, p in net.named_parameters() if id(p) in {id(q) for q in encoder_parameters(net)}}
    assert enc_names
    for name in enc_names:  # held still for all 3 steps: still the init's
        assert torch.equal(after[name], init[name]), name
    moved = [n for n, _ in net.named_parameters()
             if n not in enc_names and not torch.equal(after[n], init[n])]
    assert moved  # the decoder trained from the init
    lrs = [json.loads(x)["lr"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lrs[:2] == pytest.approx([0.005, 0.01])
    # a run whose network does not match its init fails before its first step, naming the layer
    bad = _run_cfg(phantoms, tmp_path / "bad", f"model.init={base}", "model.filters=[4,8,32]")
    with pytest.raises(MensegError, match="model.init: this network differs from"):
        train(bad, progress=False)
    assert not (tmp_path / "bad" / "latest.pt").exists()


def test_benchmark_identity_follows_the_init_weights(library: Path, tmp_path: Path) -> None:
    """A benchmark run started from a named model counts as another run once that model's weights change
    under the same name (a finished run is never silently reused for new weights)."""
    from menseg.bench.efficiency import INIT_DIGEST_KEY, RunSpec
    from menseg.utils import sha256_file

    spec = RunSpec("finetune", 3, 0, ("A", "B", "C"), tmp_path / "r", _tiny(model={"init": "tiny"}))
    stored = spec.identity()
    assert stored[INIT_DIGEST_KEY] == sha256_file(library / "tiny.pt")
    assert spec.differences(stored) == []
    other = _checkpoint(tmp_path / "run2" / "best.pt", _tiny(), seed=9)
    export_model(other.parent, "tiny", library, overwrite=True)  # new weights, the same name
    assert spec.differences(stored) == [INIT_DIGEST_KEY]
    plain = RunSpec("baseline", 3, 0, ("A", "B", "C"), tmp_path / "b", _tiny())
    assert INIT_DIGEST_KEY not in plain.identity()
