"""Network construction and checkpoint round trips."""

from __future__ import annotations

import pytest
import torch

from menseg.checkpoint import load_checkpoint, load_model, save_checkpoint
from menseg.config import Config, ModelConfig, TrainConfig, to_dict, with_overrides
from menseg.errors import MensegError
from menseg.ism.model import build_model
from menseg.nets import build_network, n_deep_heads, plan_strides, required_divisor

TINY = ModelConfig(filters=(4, 8, 16, 32), deep_supr_num=2)


def test_plan_strides_stop_at_min_size() -> None:
    _, strides = plan_strides(5, (32, 32, 16))
    assert strides[0] == [1, 1, 1]
    # z: 16 -> 8 -> 4, then stays
    assert [s[2] for s in strides] == [1, 2, 2, 1, 1]
    assert [s[0] for s in strides] == [1, 2, 2, 2, 1]
    assert required_divisor(ModelConfig(), (32, 32, 16)) == (8, 8, 4)


def test_forward_shapes_train_and_eval() -> None:
    torch.manual_seed(0)
    net = build_network(TINY, patch_size=(16, 16, 16))
    x = torch.randn(2, 4, 16, 16, 16)
    net.train()
    out = net(x)
    assert out.shape == (2, 1 + n_deep_heads(TINY), 3, 16, 16, 16)
    net.eval()
    with torch.no_grad():
        assert net(x).shape == (2, 3, 16, 16, 16)


def test_deep_supr_num_capped_and_no_ds() -> None:
    cfg = ModelConfig(filters=(4, 8, 16), deep_supr_num=3)
    assert n_deep_heads(cfg) == 1
    net = build_network(ModelConfig(filters=(4, 8, 16), deep_supervision=False), patch_size=(16,) * 3)
    net.train()
    assert net(torch.zeros(1, 4, 16, 16, 16)).shape == (1, 3, 16, 16, 16)


def test_bad_model_config() -> None:
    with pytest.raises(MensegError, match="model.name"):
        build_network(ModelConfig(name="vit"))
    with pytest.raises(MensegError, match="3 stages"):
        build_network(ModelConfig(filters=(4, 8)))


def _tiny_cfg() -> Config:
    return Config(model=TINY, train=TrainConfig(patch_size=(16, 16, 16)))


def test_checkpoint_roundtrip_and_load_model(tmp_path) -> None:
    cfg = _tiny_cfg()
    net = build_model(cfg)
    path = tmp_path / "m.pt"
    save_checkpoint(path, {"model": net.state_dict(), "config": to_dict(cfg), "step": 7})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "m.pt.sha256"]  # no temp file left
    state = load_checkpoint(path)
    assert state["step"] == 7
    model, cfg2 = load_model(path, "cpu")
    assert cfg2 == cfg
    assert not model.training
    for k, v in net.state_dict().items():
        assert torch.equal(v, model.state_dict()[k])


def test_load_checkpoint_errors(tmp_path) -> None:
    cfg = _tiny_cfg()
    net = build_model(cfg)
    good = tmp_path / "good.pt"
    save_checkpoint(good, {"model": net.state_dict(), "config": to_dict(cfg), "step": 1})

    with pytest.raises(MensegError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")

    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(MensegError, match="trunc.pt"):
        load_checkpoint(trunc)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(MensegError, match="cannot read checkpoint"):
        load_checkpoint(garbage)

    class Evil:
        def __reduce__(self):  # noqa: D105
            return (print, ("pwned",))

    unsafe = tmp_path / "unsafe.pt"
    torch.save({"model": {}, "x": Evil()}, unsafe)
    with pytest.raises(MensegError, match="unsafe"):
        load_checkpoint(unsafe)

    notdict = tmp_path / "list.pt"
    torch.save([1, 2], notdict)
    with pytest.raises(MensegError, match="not a menseg checkpoint"):
        load_checkpoint(notdict)

    # Weights that do not match the stored architecture.
    other = tmp_path / "other.pt"
    wrong = with_overrides(cfg, ["model.filters=[4,8,16,64]"])
    save_checkpoint(other, {"model": net.state_dict(), "config": to_dict(wrong)})
    with pytest.raises(MensegError, match="do not match"):
        load_model(other)
