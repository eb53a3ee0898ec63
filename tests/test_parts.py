"""The plug-in interface of the trainer: which parts a config builds, in which order, what cannot be
combined, and a new part added without touching the trainer."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from menseg.config import Config, load_config
from menseg.data.phantom import write_phantom_dataset
from menseg.errors import MensegError
from menseg.train import parts as parts_mod
from menseg.train import trainer as trainer_mod
from menseg.train.parts import Part, TrainSetup, build_parts, check_parts

TINY = ["model.filters=[4,8,16]", "model.deep_supr_num=1", "train.patch_size=[16,16,16]",
        "train.batch_size=2", "train.val_every=100", "train.checkpoint_every=2", "train.seed=1",
        "data.val_fraction=0"]


def test_the_trainer_names_no_idea() -> None:
    text = Path(trainer_mod.__file__).read_text()
    found = re.findall(r"\b(ism|sim2real|s2r|align\w*|inject\w*|visits?)\b", text, flags=re.IGNORECASE)
    assert not found, found


@pytest.mark.parametrize("name, want", [("baseline", []), ("demo", []), ("ism", ["ism"]),
                                        ("ism-modal", ["ism"]), ("sim2real", ["sim2real"]),
                                        ("both", ["sim2real", "ism"]), ("sim2real/s2r-all", ["sim2real"]),
                                        ("carvemix", ["carvemix"]), ("tumorcp", ["tumorcp"])])
def test_configs_build_their_parts_in_the_fixed_order(name: str, want: list[str]) -> None:
    assert [p.name for p in build_parts(load_config(name))] == want


class _Fake(Part):
    sample_hint = "how to avoid it"

    def __init__(self, name: str, kind: str | None = None, runs_on: frozenset[str] = frozenset({"cases"}),
                 owns: bool = False) -> None:
        super().__init__(Config())
        self.name, self.runs_on = name, runs_on  # type: ignore[misc]
        self.sample_kind, self.owns_forward = kind, owns


def test_parts_that_cannot_run_together_are_refused_in_one_line() -> None:
    both = frozenset({"cases", "pairs"})
    check_parts([_Fake("a", "pairs", frozenset({"pairs"})), _Fake("b", runs_on=both)])
    with pytest.raises(MensegError, match=r"^b does not run on pairs yet \(how to avoid it\)$"):
        check_parts([_Fake("a", "pairs", frozenset({"pairs"})), _Fake("b")])
    with pytest.raises(MensegError, match="a and b both choose the training samples"):
        check_parts([_Fake("a", "x", frozenset({"x", "y"})), _Fake("b", "y", frozenset({"x", "y"}))])
    with pytest.raises(MensegError, match="a and b both replace the forward pass"):
        check_parts([_Fake("a", owns=True), _Fake("b", owns=True)])


def test_sim2real_on_visit_pairs_is_refused_before_any_work(tmp_path: Path) -> None:
    from menseg.synth.engine import SynthConfig, synth_dataset, with_spacing
    from menseg.train.trainer import train

    root = tmp_path / "long"
    synth_dataset(root, 2, "longitudinal", seed=1, cfg=with_spacing(SynthConfig(), 6.0), visits=2,
                  device="cpu")
    cfg = load_config("both", [*TINY, f"data.root={root}", f"out_dir={tmp_path / 'run'}"])
    with pytest.raises(MensegError, match="sim2real does not run on visit pairs yet .*longitudinal"):
        train(cfg, progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


class WeightPenalty(Part):
    """The example part of docs/DESIGN.md: an L2 penalty on the weights as an extra loss term."""

    name = "penalty"
    count_stats = frozenset()

    @classmethod
    def enabled(cls, cfg: Config) -> bool:
        return cfg.name == "penalised"

    def setup(self, run: TrainSetup) -> None:
        self.model = run.model

    def bind(self, model: nn.Module) -> None:
        self.model = model

    def extra_loss(self, step: int, device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
        loss = 0.5 * sum(p.pow(2).sum() for p in self.model.parameters())
        return loss, {"penalty": float(loss.detach())}  # type: ignore[union-attr]


def test_a_new_part_plugs_in_without_touching_the_trainer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    from menseg.checkpoint import load_checkpoint
    from menseg.train.trainer import train

    monkeypatch.setattr(parts_mod, "_REGISTRY", dict(parts_mod._REGISTRY))
    parts_mod.register(WeightPenalty)
    write_phantom_dataset(tmp_path / "data", n_cases=2, shape=(24, 24, 24), seed=3)

    def run(name: str) -> tuple[dict, list[dict]]:
        out = tmp_path / name
        train(load_config("baseline", [*TINY, f"name={name}", f"data={tmp_path / 'data'}", f"out_dir={out}",
                                       "train.steps=3"]), progress=False)
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return load_checkpoint(out / "latest.pt")["model"], recs

    plain, plain_recs = run("plain")
    pen, pen_recs = run("penalised")
    names = [p.name for p in build_parts(load_config("baseline", ["name=penalised"]))]
    assert names == ["penalty"]
    assert "penalty" not in plain_recs[0] and all(r["penalty"] > 0 for r in pen_recs)
    assert all(r["loss"] > r["penalty"] for r in pen_recs)  # the term joins the segmentation loss
    norm = {k: float(sum(v.pow(2).sum() for n, v in w.items() if n.endswith("weight"))) for k, w in
            (("plain", plain), ("pen", pen))}
    assert norm["pen"] < norm["plain"]  # and pulls the weights towards 0
