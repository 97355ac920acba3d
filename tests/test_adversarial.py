"""The adversarial term (dmdiff.train.adversarial): the critic, its isolation from the generator,
warm-up, the off switch, checkpoints and exact resume."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from test_train import same_weights, tiny, write_dataset  # noqa: E402

from dmdiff.errors import DmdiffError  # noqa: E402
from dmdiff.train import checkpoint as ckpt_io  # noqa: E402
from dmdiff.train.adversarial import (  # noqa: E402
    Adversary,
    PatchDiscriminator,
    hinge_d_loss,
    hinge_g_loss,
    r1_penalty,
)
from dmdiff.train.config import AdversarialConfig, load_train_config  # noqa: E402
from dmdiff.train.loop import train  # noqa: E402

#: Both adversarial paths, an R1 penalty and a per-path loss, on mixed (per-sample) batches.
ADVERSARIAL = {"weight": 0.1, "start_step": 2, "lr": 1e-3, "r1_weight": 1.0, "channels": 8,
               "paths": ["positive", "negative"]}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("adv-data") / "data")


def config(data: Path, **changes):
    return load_train_config(tiny(data, loss_by_path={"neutral": {"lpips": 0}}, keep_last=3, **changes))


@pytest.fixture(scope="module")
def runs(dataset, tmp_path_factory, psf_cache):
    """``plain``: 4 steps without an adversarial section; ``adv``: 6 steps with one (warm-up 2)."""
    root = tmp_path_factory.mktemp("adv-runs")
    plain = train(config(dataset, steps=4), root / "plain", progress=False)
    adv = train(config(dataset, adversarial=ADVERSARIAL), root / "adv", progress=False)
    return {"plain": (root / "plain", plain), "adv": (root / "adv", adv)}


def metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "step_time_s"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---- the pieces --------------------------------------------------------------------------------


def test_patch_discriminator_is_float32_under_autocast_and_losses_are_hinge():
    net = PatchDiscriminator(channels=8)
    x = torch.rand(2, 3, 48, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = net(x)
    assert logits.shape == (2, 1, 6, 5) and logits.dtype == torch.float32
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-3.0, 0.0, 1.0])
    assert hinge_d_loss(real, fake) == pytest.approx((0 + 0.5 + 2) / 3 + (0 + 1 + 2) / 3)
    assert hinge_g_loss(fake) == pytest.approx(2 / 3)
    # R1 of a linear critic: the per-image mean of sum_c w_c x_c has gradient w_c / (H W) everywhere
    w = torch.tensor([1.0, -2.0, 3.0]).view(1, 3, 1, 1)
    real_images = torch.rand(2, 3, 4, 5, requires_grad=True)
    penalty = r1_penalty((real_images * w).sum(dim=1, keepdim=True), real_images)
    assert penalty.item() == pytest.approx(14.0 / 20)
    assert r1_penalty(torch.zeros(0, 1, 2, 2), torch.zeros(0, 3, 4, 4, requires_grad=True)) == 0


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("r1_weight", [0.0, 1.0])
def test_discriminator_gets_gradients_only_from_its_own_loss(r1_weight):
    """The generator term's backward leaves every discriminator tensor (weights, spectral-norm
    vectors) as it was and gives them no gradient; the discriminator's step leaves the generator's
    parameters and gradients as they were."""
    torch.manual_seed(0)
    generator = torch.nn.Conv2d(3, 3, 3, padding=1)
    adversary = Adversary(AdversarialConfig(weight=0.5, r1_weight=r1_weight, channels=8), ["positive"], seed=0)
    lr_images, target = torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32)
    output = generator(lr_images).sigmoid()
    before = _state(adversary.nets)
    term, terms = adversary.generator_loss(output, ["positive"] * 4)
    (term + (output - target).pow(2).mean()).backward()
    assert _same(before, _state(adversary.nets))
    assert all(p.grad is None for p in adversary.nets.parameters()) and adversary.nets.training
    assert set(terms) == {"adv_g"} and all(p.grad.abs().sum() > 0 for p in generator.parameters())
    # the term is what it says: weight · hinge_G of the critic's logits
    with adversary.frozen():
        expected = 0.5 * hinge_g_loss(adversary.nets["positive"](output.detach()))
    assert torch.allclose(term.detach(), expected)

    grads = {k: p.grad.clone() for k, p in generator.named_parameters()}
    params = _state(generator)
    d_terms = adversary.discriminator_step(target, output, ["positive"] * 4, step=1)
    assert {k: p.grad for k, p in generator.named_parameters()}.keys() == grads.keys()
    assert all(torch.equal(p.grad, grads[k]) for k, p in generator.named_parameters())
    assert _same(params, _state(generator))
    assert not _same(before, _state(adversary.nets))                 # the critic did learn
    assert all(p.grad is None for p in adversary.nets.parameters())
    assert set(d_terms) == {"adv_d", "d_real", "d_fake"} | ({"r1"} if r1_weight else set())


def test_mixed_batches_weight_each_image_by_its_path():
    adversary = Adversary(AdversarialConfig(weight=0.2, channels=8, paths=("positive", "negative")),
                          ["positive", "negative"], seed=1)
    output = torch.rand(4, 3, 32, 32)
    paths = ["positive", "neutral", "negative", "positive"]
    term, terms = adversary.generator_loss(output, paths)
    with adversary.frozen():
        pos = hinge_g_loss(adversary.nets["positive"](output[[0, 3]]))
        neg = hinge_g_loss(adversary.nets["negative"](output[[2]]))
    assert torch.allclose(term, 0.2 * (2 / 4 * pos + 1 / 4 * neg))
    assert torch.allclose(terms["adv_g"], (2 * pos + neg) / 3)
    # no image of an adversarial path: no term, and the critics do not step
    before = _state(adversary.nets)
    assert adversary.generator_loss(output, ["neutral"] * 4) == (None, {})
    assert adversary.discriminator_step(output, output, ["neutral"] * 4, step=1) == {}
    assert _same(before, _state(adversary.nets))
    # the images of one path train only that path's critic
    adversary.discriminator_step(torch.rand(4, 3, 32, 32), output, ["negative", "neutral", "negative", "neutral"], 1)
    after = _state(adversary.nets)
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith("positive."))
    assert not all(torch.equal(after[k], before[k]) for k in before if k.startswith("negative."))


def test_discriminator_initialisation_leaves_the_global_generator_alone():
    state = torch.get_rng_state()
    a = Adversary(AdversarialConfig(channels=8), ["positive"], seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    b = Adversary(AdversarialConfig(channels=8), ["positive"], seed=5)
    assert _same(_state(a.nets), _state(b.nets))


# ---- runs --------------------------------------------------------------------------------------


def test_warm_up_and_logged_terms(runs):
    """Before start_step no generator term is logged and the generator trains exactly as without an
    adversarial section (the critic trains meanwhile); afterwards all terms are logged."""
    plain, adv = runs["plain"][0], runs["adv"][0]
    lines = [r for r in metrics(adv) if r["kind"] == "train"]
    assert [r["step"] for r in lines] == [2, 4, 6]
    assert "adv_g" not in lines[0] and {"adv_d", "d_real", "d_fake", "r1"} <= set(lines[0])
    assert all({"adv_g", "adv_d", "d_real", "d_fake", "r1"} <= set(r) for r in lines[1:])
    assert lines[0]["loss"] == next(r for r in metrics(plain) if r["kind"] == "train")["loss"]
    a, b = (load_file(str(run / "checkpoint-2" / "model.safetensors")) for run in (plain, adv))
    assert all(torch.equal(a[k], b[k]) for k in a)
    a, b = (load_file(str(run / "checkpoint-4" / "model.safetensors")) for run in (plain, adv))
    assert not all(torch.equal(a[k], b[k]) for k in a)
    report = runs["adv"][1]
    assert report["adversarial"]["weight"] == 0.1 and report["adversarial"]["paths_trained"] == ["positive", "negative"]
    assert set(report["adversarial"]["final"]) == {"adv_g", "adv_d", "d_real", "d_fake", "r1"}
    assert runs["plain"][1]["adversarial"] is None
    # the discriminators are in the checkpoints, never in the exported pipeline
    state = json.loads((adv / "checkpoint-6" / "state.json").read_text())
    assert set(ckpt_io.DISCRIMINATOR_FILES) <= set(state["files"])
    assert not any("discriminator" in p.name for p in (adv / "pipeline").rglob("*"))
    assert not any("discriminator" in p.name for p in plain.rglob("*"))


def test_weight_zero_is_the_run_without_the_section(runs, dataset, tmp_path):
    out = tmp_path / "off"
    report = train(config(dataset, steps=4, adversarial={**ADVERSARIAL, "weight": 0.0}), out, progress=False)
    assert report["adversarial"] is None
    assert same_weights(runs["plain"][0], out)
    assert metrics(out) == metrics(runs["plain"][0])
    assert not any("discriminator" in p.name for p in out.rglob("*"))


def test_resume_with_the_adversarial_term_is_bit_identical(runs, dataset, tmp_path):
    reference = runs["adv"][0]
    cfg = config(dataset, adversarial=ADVERSARIAL)
    out = tmp_path / "resumed"
    half = config(dataset, adversarial=ADVERSARIAL, checkpoint_every=3)   # a checkpoint after step 3 of 6
    assert train(half, out, progress=False, stop_at_step=3) == {"completed": False, "steps": 3}
    report = train(cfg, out, "latest", progress=False)
    assert report["resumed_from_step"] == 3
    assert same_weights(reference, out)
    for name in ("model.safetensors", ckpt_io.DISCRIMINATOR, "discriminator_optimizer.safetensors"):
        a, b = (load_file(str(run / "checkpoint-6" / name)) for run in (reference, out))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # the log line of step 4 averages steps 3-4 in one run and step 4 alone in the other
    differ = [(r["step"], r["kind"]) for r, q in zip(metrics(out), metrics(reference)) if r != q]
    assert differ == [(4, "train")] and len(metrics(out)) == len(metrics(reference))
    assert report["adversarial"] == runs["adv"][1]["adversarial"]


def test_checkpoints_that_do_not_fit_the_adversarial_settings(runs, dataset, tmp_path):
    plain, adv = runs["plain"][0], runs["adv"][0]
    with pytest.raises(DmdiffError, match=r"checkpoint-4 has no discriminator \(discriminator.safetensors\), but "
                                          r"the config trains one \(adversarial.weight = 0.1"):
        train(config(dataset, adversarial=ADVERSARIAL), tmp_path / "a", str(plain / "checkpoint-4"), progress=False)
    with pytest.raises(DmdiffError, match=r"checkpoint-4: its discriminator does not fit adversarial.paths = "
                                          r"\['positive', 'negative'\], adversarial.channels = 16"):
        train(config(dataset, adversarial={**ADVERSARIAL, "channels": 16}), tmp_path / "b",
              str(adv / "checkpoint-4"), progress=False)
    with pytest.warns(UserWarning, match="holds a discriminator, but this config trains none"):
        train(config(dataset, steps=5), tmp_path / "c", str(adv / "checkpoint-4"), progress=False)
    # a checkpoint listing only part of the discriminator's files is damaged
    broken = tmp_path / "broken"
    shutil.copytree(adv / "checkpoint-4", broken)
    state = json.loads((broken / "state.json").read_text())
    del state["files"]["discriminator_optimizer.json"]
    (broken / "state.json").write_text(json.dumps(state))
    with pytest.raises(DmdiffError, match=r"lacks \['discriminator_optimizer.json'\]"):
        ckpt_io.load_checkpoint(broken)
