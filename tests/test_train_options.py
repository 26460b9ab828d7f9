"""The timm train.py options of the vision task that review rev5 found missing, each against timm itself:
EMA without warm-up and with averaged buffers (timm.utils.ModelEmaV3), mixup / CutMix switch probability, modes,
min/max box and off epoch (timm.data.Mixup, train.py --mixup-off-epoch), layer-decay min scale / no-opt scale
(timm.optim.param_groups_layer_decay), and adaptive gradient clipping as a constructor argument."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

import zoo
import zoo.tasks.vision.module as vision
from zoo.tasks.vision.module import ImageClassifier, cutmix_box_minmax, mix_batch, mix_elements
from zoo.train import ModelEma, param_groups
from zoo.train import run

from conftest import FAST_RUN


class _ConvBn(nn.Module):
    """A small classifier with BatchNorm buffers (running statistics, batch count) and ``num_classes``."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.num_classes = num_classes
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, num_classes)

    def forward(self, x_BCHW):
        return self.head(self.norm(self.conv(x_BCHW)).relu().mean((-2, -1)))


def _fit(module, images, labels, max_epochs=1, callbacks=(), batch_size=4, **trainer_options):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    trainer = pl.Trainer(max_epochs=max_epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", limit_val_batches=0, num_sanity_val_steps=0,
                         callbacks=list(callbacks), **trainer_options)
    trainer.fit(module, train_dataloaders=DataLoader(TensorDataset(images, labels), batch_size=batch_size))
    return trainer


# --------------------------------------------------------------------------------------------------
# EMA: task.ema_warmup, task.ema_buffers
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("warmup", [False, "timm"])
def test_ema_without_warmup_averaging_buffers_is_timms_model_ema_v3(warmup):
    """ModelEma(warmup=False, buffers="average") equals timm's ModelEmaV3(decay=D) as timm's train.py updates it
    for --model-ema (``update(model, step=num_updates)``: the first update copies the weights, then decay D;
    floating-point buffers averaged, num_batches_tracked copied) after every step, BatchNorm statistics included;
    warmup="timm" equals ModelEmaV3(decay=D, use_warmup=True), train.py's --model-ema-warmup (decay
    min(D, 1 - (1 + t) ** -2/3)). The default buffers="copy" does not (it takes the model's statistics)."""
    from timm.utils import ModelEmaV3

    torch.manual_seed(0)
    model = _ConvBn()
    ours, theirs = (ModelEma(model, 0.8, warmup=warmup, buffers="average"),
                    ModelEmaV3(model, decay=0.8, use_warmup=warmup == "timm"))
    copied = ModelEma(model, 0.8, warmup=warmup)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for num_updates in range(1, 9):
        model(torch.randn(4, 1, 6, 6) * 2 + 1).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        assert ours.current_decay() == theirs.get_decay(num_updates)
        for ema in (ours, copied):
            ema.update(model)
        theirs.update(model, step=num_updates)
        ours_state, theirs_state = ours.module.state_dict(), theirs.module.state_dict()
        assert ours_state.keys() == theirs_state.keys()
        for name in theirs_state:
            torch.testing.assert_close(ours_state[name], theirs_state[name], rtol=1e-6, atol=1e-7, msg=name)
    assert int(ours_state["norm.num_batches_tracked"]) == 8
    assert (ours.current_decay() < 0.8) == (warmup == "timm")  # 1 - 9 ** (-2/3) = 0.77 after 8 updates
    assert not torch.allclose(ours_state["norm.running_mean"], model.norm.running_mean)
    torch.testing.assert_close(copied.module.norm.running_mean, model.norm.running_mean, rtol=0, atol=0)


def test_task_ema_options_reach_the_module_and_train_as_timm():
    """ImageClassifier(ema_warmup=False, ema_buffers="average") trained 3 steps: its EMA equals ModelEmaV3(decay)
    updated with the weights after each optimizer step. The defaults keep the warm-up and the copied buffers."""
    from lightning.pytorch.callbacks import Callback
    from timm.utils import ModelEmaV3

    torch.manual_seed(0)
    module = ImageClassifier(_ConvBn(), lr=1e-2, warmup_epochs=0, ema_decay=0.9, ema_warmup=False,
                             ema_buffers="average")
    reference = ModelEmaV3(module.model, decay=0.9)  # updated as timm's train.py does (step=num_updates)
    after_step = []

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            after_step.append(copy.deepcopy(pl_module.model))

    generator = torch.Generator().manual_seed(1)
    images, labels = torch.randn(12, 1, 6, 6, generator=generator) + 1, torch.randint(0, 3, (12,), generator=generator)
    _fit(module, images, labels, callbacks=[Record()])
    assert len(after_step) == 3
    for num_updates, weights in enumerate(after_step, start=1):
        reference.update(weights, step=num_updates)
    ours, theirs = module.model_ema.module.state_dict(), reference.module.state_dict()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-6, atol=1e-7, msg=name)
    assert module.hparams["ema_warmup"] is False and module.hparams["ema_buffers"] == "average"
    default = ImageClassifier(_ConvBn(), ema_decay=0.9).model_ema
    assert default.warmup and default.buffers_mode == "copy"


def test_ema_and_mix_options_are_checked():
    model = _ConvBn()
    for options, message in (
        (dict(ema_decay=0.9, ema_buffers="mean"), "ema_buffers must be copy .* or average .*got 'mean'"),
        (dict(ema_warmup="no"), "ema_warmup must be true .*, false .* or 'timm'"),
        (dict(mix_switch_prob=1.5), r"mix_switch_prob must be in \[0, 1\]"),
        (dict(mix_mode="element"), "mix_mode must be one of batch, pair, elem .*got 'element'"),
        (dict(cutmix_minmax=[0.8, 0.2]), r"cutmix_minmax must be \[min, max\] with 0 <= min < max <= 1"),
        (dict(cutmix_minmax=0.5), r"cutmix_minmax must be null or \[min, max\]"),
        (dict(mixup_off_epoch=-1), "mixup_off_epoch must be an integer >= 0"),
        (dict(mixup_off_epoch=1.5), "mixup_off_epoch must be an integer >= 0"),
        (dict(layer_decay_min_scale=0.2), "layer_decay_min_scale / layer_decay_no_opt_scale act on layer-wise"),
        (dict(layer_decay=0.5, layer_decay_no_opt_scale=2.0), r"layer_decay_no_opt_scale must be in \[0, 1\]"),
        (dict(adaptive_clip_factor=0), r"adaptive_clip_factor .* needs its clip factor positive .*got 0"),
    ):
        with pytest.raises((ValueError, TypeError), match=message):
            ImageClassifier(model, **options)
    with pytest.raises(ValueError, match=r"cutmix_minmax=\[0.5, 0.55\] leaves no box size for 8 x 8 images"):
        cutmix_box_minmax(8, 8, (0.5, 0.55))


# --------------------------------------------------------------------------------------------------
# Mixup / CutMix: switch prob, modes, min/max box, off epoch
# --------------------------------------------------------------------------------------------------
def _timm_mixup(**options):
    from timm.data import Mixup

    return Mixup(label_smoothing=0.0, num_classes=8, **options)


def _decisions(x_BCHW, mixed_BCHW, targets_BK, labels_B):
    """Per image: (mixed, cutmix, lam), read from the output (a CutMix image holds its own and its partner's pixels
    exactly; the own label's target weight is lam, the labels all differ and smoothing is 0)."""
    partner = x_BCHW.flip(0)
    rows = []
    for i in range(len(x_BCHW)):
        lam = float(targets_BK[i, labels_B[i]])
        own, other = mixed_BCHW[i] == x_BCHW[i], mixed_BCHW[i] == partner[i]
        cut = bool((own | other).all()) and not bool(own.all())
        rows.append((lam < 1.0, cut, lam))
    return rows


def _summary(rows):
    mixed = [r for r in rows if r[0]]
    cut = [r for r in mixed if r[1]]
    blend = [r for r in mixed if not r[1]]
    return (len(mixed) / len(rows), len(cut) / len(mixed), float(np.mean([r[2] for r in cut])),
            float(np.mean([r[2] for r in blend])))


@pytest.mark.parametrize("mode", ["batch", "elem", "pair"])
def test_mix_modes_and_switch_prob_match_timms_mixup(mode):
    """For each mode, over 300 batches of 8: the frequency of mixing (prob 0.7), of CutMix among mixed images
    (switch_prob 0.3, not the default 0.5), and the mean lambda of each kind agree with timm's Mixup (numpy's RNG
    there, torch's here: within sampling noise). Every output is exact: lam x_i + (1 - lam) x_j or a box of the
    partner's pixels whose area is 1 - lam, targets lam y_i + (1 - lam) y_j; in pair mode both partners share lam
    and the box; in batch mode every image shares them."""
    torch.manual_seed(0)
    np.random.seed(0)
    options = dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.7, switch_prob=0.3)
    x_BCHW, labels_B = torch.randn(8, 1, 10, 10), torch.arange(8)
    targets_BK = vision.soft_targets(labels_B, 8, 0.0)
    theirs, ours = [], []
    timm_mixup = _timm_mixup(mode=mode, **options)
    for _ in range(300):
        mixed, targets = timm_mixup(x_BCHW.clone(), labels_B)
        theirs += _decisions(x_BCHW, mixed, targets, labels_B)
        if mode == "batch":
            mixed, targets, lam, _ = mix_batch(x_BCHW, targets_BK, **options)
            lam_B = torch.full((8,), lam)
        else:
            mixed, targets, lam_B = mix_elements(x_BCHW, targets_BK, **options, pairs=mode == "pair")
        rows = _decisions(x_BCHW, mixed, targets, labels_B)
        ours += rows
        partner = x_BCHW.flip(0)
        for i, (was_mixed, cut, lam) in enumerate(rows):
            assert lam == pytest.approx(float(lam_B[i]), abs=1e-6)
            torch.testing.assert_close(targets[i], lam * targets_BK[i] + (1 - lam) * targets_BK.flip(0)[i])
            if cut:
                assert float((mixed[i] != x_BCHW[i]).float().mean()) == pytest.approx(1 - lam, abs=1e-6)
            elif was_mixed:
                torch.testing.assert_close(mixed[i], lam * x_BCHW[i] + (1 - lam) * partner[i])
        if mode != "elem":  # shared draws: the partner (pair) or every image (batch) has the same lam and box
            groups = [(i, 7 - i) for i in range(4)] if mode == "pair" else [tuple(range(8))]
            for group in groups:
                assert len({round(rows[i][2], 6) for i in group}) == 1
                boxes = {tuple((mixed[i] != x_BCHW[i]).flatten().tolist()) for i in group}
                assert len(boxes) == 1 or not rows[group[0]][1]
    for a, b, tolerance in zip(_summary(ours), _summary(theirs), (0.05, 0.07, 0.04, 0.04)):
        assert a == pytest.approx(b, abs=tolerance), (_summary(ours), _summary(theirs))
    assert _summary(ours)[1] == pytest.approx(0.3, abs=0.07)


def test_cutmix_minmax_boxes_are_timms_rand_bbox_minmax():
    """cutmix_minmax=[0.2, 0.7] on 20 x 30 images: box sides take exactly timm's values (int(H min) ..
    int(H max) - 1, numpy's exclusive upper end), every box lies inside the image with every position occurring,
    lambda is 1 - box area; and as in timm it switches CutMix on with cutmix_alpha=0."""
    from timm.data.mixup import rand_bbox_minmax

    torch.manual_seed(0)
    np.random.seed(0)
    ours = [cutmix_box_minmax(20, 30, (0.2, 0.7)) for _ in range(3000)]
    theirs = [tuple(int(v) for v in rand_bbox_minmax((20, 30), (0.2, 0.7))) for _ in range(3000)]

    def sides(boxes):
        return {y1 - y0 for y0, y1, _, _ in boxes}, {x1 - x0 for _, _, x0, x1 in boxes}

    assert sides(ours) == sides(theirs) == (set(range(4, 14)), set(range(6, 21)))
    assert all(0 <= y0 < y1 <= 20 and 0 <= x0 < x1 <= 30 for y0, y1, x0, x1 in ours)
    assert {y0 for y0, y1, _, _ in ours if y1 - y0 == 4} == set(range(0, 17))  # 0 .. H - cut
    x_BCHW, labels_B = torch.randn(4, 1, 20, 30), torch.arange(4)
    targets_BK = vision.soft_targets(labels_B, 8, 0.0)
    mixed, targets, lam, kind = mix_batch(x_BCHW, targets_BK, cutmix_minmax=(0.2, 0.7))
    assert kind == "cutmix"
    assert float((mixed[0] != x_BCHW[0]).float().mean()) == pytest.approx(1 - lam, abs=1e-6)
    assert float(targets[0, 0]) == pytest.approx(lam)
    timm_mixup = _timm_mixup(mixup_alpha=0.0, cutmix_alpha=0.0, cutmix_minmax=(0.2, 0.7))
    assert timm_mixup._params_per_batch()[1] is True  # timm: CutMix on
    for pairs in (False, True):
        mixed, targets, lam_B = mix_elements(x_BCHW, targets_BK, cutmix_minmax=(0.2, 0.7), pairs=pairs)
        for i in range(4):
            assert float((mixed[i] != x_BCHW[i]).float().mean()) == pytest.approx(1 - float(lam_B[i]), abs=1e-6)
            assert 1 - 14 * 21 / 600 <= float(lam_B[i]) <= 1 - 4 * 6 / 600


def test_mixup_off_epoch_stops_mixing_from_that_epoch():
    """task.mixup_off_epoch=2 (timm's --mixup-off-epoch): the batches of epochs 0 and 1 reach the model mixed,
    those of epoch 2 as they are, with the plain label-smoothed loss; 0 never stops."""
    from lightning.pytorch.callbacks import Callback

    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(8, 1, 6, 6, generator=generator), torch.randint(0, 3, (8,), generator=generator)
    for off_epoch, expected in ((2, [True, True, True, True, False, False]), (0, [True] * 6)):
        torch.manual_seed(0)
        module = ImageClassifier(_ConvBn(), mixup_alpha=1.0, cutmix_alpha=1.0, mix_mode="elem",
                                 mixup_off_epoch=off_epoch, warmup_epochs=0)
        seen = []
        module.model.register_forward_pre_hook(
            lambda mod, args: seen.append(args[0].clone()) if mod.training else None)

        class Epochs(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                seen.append(batch[0].clone())

        _fit(module, images, labels, max_epochs=3, callbacks=[Epochs()])
        raw, inputs = seen[0::2], seen[1::2]
        assert [not torch.equal(a, b) for a, b in zip(raw, inputs)] == expected
        assert module.mixing() == (off_epoch == 0)


def test_mix_options_reach_the_mixing_functions(monkeypatch):
    """The task keys are what the training step passes: switch prob and min/max box to mix_batch (batch mode),
    the pair flag to mix_elements; zoo train's config carries them to the module."""
    calls = []
    for name in ("mix_batch", "mix_elements"):
        original = getattr(vision, name)
        monkeypatch.setattr(vision, name, lambda *a, _f=original, _n=name, **k: calls.append((_n, a[2:], k)) or _f(*a, **k))
    images, labels = torch.randn(4, 1, 6, 6), torch.arange(4) % 3
    for mode in ("batch", "pair", "elem"):
        module = ImageClassifier(_ConvBn(), mixup_alpha=0.5, mix_switch_prob=0.25, mix_mode=mode,
                                 cutmix_minmax=[0.3, 0.9], warmup_epochs=0)
        _fit(module, images, labels)
    assert [c[0] for c in calls] == ["mix_batch", "mix_elements", "mix_elements"]
    assert calls[0][1] == (0.5, 0.0, 1.0, 0.25, (0.3, 0.9))
    assert calls[1][1] == (0.5, 0.0, 1.0, 0.25, True, (0.3, 0.9)) and calls[2][1][4] is False
    cfg = run.compose([*FAST_RUN, "run_dir=unused", "task.mix_switch_prob=0.2", "task.mix_mode=pair",
                       "task.cutmix_minmax=[0.1,0.6]", "task.mixup_off_epoch=3", "task.ema_warmup=false",
                       "task.ema_buffers=average", "task.layer_decay=0.5", "task.layer_decay_min_scale=0.3"])
    module, _ = run.build(cfg)
    assert (module.mix_switch_prob, module.mix_mode, module.cutmix_minmax, module.mixup_off_epoch) == (
        0.2, "pair", (0.1, 0.6), 3)
    assert module.model_ema.warmup is False and module.model_ema.buffers_mode == "average"
    assert module._opt_cfg["layer_decay_min_scale"] == 0.3


# --------------------------------------------------------------------------------------------------
# Layer decay: min scale, no-opt scale
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("min_scale,no_opt_scale", [(0.2, None), (0.0, 0.3), (0.35, 0.3)])
def test_layer_decay_min_and_no_opt_scales_match_timm(min_scale, no_opt_scale):
    """param_groups(min_scale=, no_opt_scale=) equals timm's param_groups_layer_decay (create_optimizer_v2's
    layer_decay_min_scale / layer_decay_no_opt_scale) on the same ViT: every trained parameter's lr scale and weight
    decay, and the same parameters frozen (requires_grad False)."""
    import timm
    from timm.optim import param_groups_layer_decay

    kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=10)
    ours, peer = zoo.create_model("vit_debug", **kwargs), timm.create_model("vit_tiny_patch16_224", **kwargs)
    theirs = param_groups_layer_decay(peer, weight_decay=0.05, no_weight_decay_list=peer.no_weight_decay(),
                                      layer_decay=0.6, min_scale=min_scale, no_opt_scale=no_opt_scale)
    name_of = {id(p): n for n, p in peer.named_parameters()}
    expected = {name_of[id(p)]: (g["lr_scale"], g["weight_decay"]) for g in theirs for p in g["params"]}
    got = {n: (g["lr_scale"], g["weight_decay"])
           for g in param_groups(ours, 0.05, 0.6, min_scale=min_scale, no_opt_scale=no_opt_scale)
           for n in g["param_names"]}
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name][0] == pytest.approx(expected[name][0]) and got[name][1] == expected[name][1], name
    frozen = {n for n, p in ours.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, p in peer.named_parameters() if not p.requires_grad}
    assert bool(frozen) == (no_opt_scale is not None and no_opt_scale > min_scale)  # a clamped scale is kept
    assert min(scale for scale, _ in got.values()) >= max(min_scale, no_opt_scale or 0) - 1e-12


def test_layer_decay_no_opt_scale_freezes_those_layers_in_training():
    """task.layer_decay_no_opt_scale: the layers below the scale keep their weights through training (frozen at
    construction, as timm's create_optimizer_v2 freezes them), the others train, and the optimizer holds only the
    trained ones with scales clamped at layer_decay_min_scale."""
    torch.manual_seed(0)
    model = zoo.create_model("vit_debug", num_classes=3, img_size=16, patch_size=8)
    module = ImageClassifier(model, lr=1e-2, warmup_epochs=0, layer_decay=0.5, layer_decay_min_scale=0.3,
                             layer_decay_no_opt_scale=0.4)
    before = copy.deepcopy(model.state_dict())
    images, labels = torch.randn(8, 3, 16, 16), torch.arange(8) % 3
    trainer = _fit(module, images, labels)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("blocks.0.", "blocks.1.", "patch_embed", "cls_token", "pos_embed"))
                          for n in frozen)
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]) == (name in frozen), name
    groups = trainer.optimizers[0].param_groups
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters())) - len(frozen)
    assert min(g["lr_scale"] for g in groups) == pytest.approx(0.5)


# --------------------------------------------------------------------------------------------------
# Adaptive gradient clipping from Python
# --------------------------------------------------------------------------------------------------
def test_adaptive_clip_factor_is_a_constructor_argument_saved_in_hparams():
    """ImageClassifier(adaptive_clip_factor=F) clips as timm.utils.adaptive_clip_grad(F) on every parameter but the
    classifier; F is in the hyper-parameters (also when zoo train sets it on the built module)."""
    from timm.models import model_parameters
    from timm.utils import adaptive_clip_grad

    torch.manual_seed(0)
    module = ImageClassifier(zoo.create_model("vit_debug", num_classes=3, img_size=16, patch_size=8),
                             adaptive_clip_factor=0.002)
    assert module.hparams["adaptive_clip_factor"] == 0.002
    module.model(torch.randn(4, 3, 16, 16)).square().mean().backward()
    reference = copy.deepcopy(module.model)  # (without the gradients)
    for theirs, ours in zip(reference.parameters(), module.model.parameters()):
        theirs.grad = ours.grad.clone()
    adaptive_clip_grad(model_parameters(reference, exclude_head=True), clip_factor=0.002)
    before = [p.grad.clone() for p in module.model.parameters()]
    module.configure_gradient_clipping(None)
    changed = 0
    for (name, ours), theirs, grad in zip(module.model.named_parameters(), reference.parameters(), before):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=0, atol=0, msg=name)
        changed += not torch.equal(ours.grad, grad)
    assert changed >= 4
    module.adaptive_clip_factor = 0.01
    assert module.hparams["adaptive_clip_factor"] == 0.01
    cfg = run.compose([*FAST_RUN, "run_dir=unused", "trainer.gradient_clip_algorithm=agc",
                       "trainer.gradient_clip_val=0.03"])
    built, _ = run.build(cfg)
    assert built.adaptive_clip_factor == 0.03 and built.hparams["adaptive_clip_factor"] == 0.03


def test_adaptive_clipping_with_a_trainer_clip_value_is_refused():
    """A module with adaptive_clip_factor under Trainer(gradient_clip_val=...): only one clipping can run, and the
    Trainer's was skipped silently; now fit refuses it before the first step, naming both."""
    module = ImageClassifier(_ConvBn(), adaptive_clip_factor=0.01, warmup_epochs=0)
    start = copy.deepcopy(module.model.state_dict())
    with pytest.raises(ValueError, match=r"adaptive_clip_factor=0.01 .* gradient_clip_val=1.0 \(norm clipping\)"):
        _fit(module, torch.randn(4, 1, 6, 6), torch.arange(4) % 3, gradient_clip_val=1.0)
    for name, value in module.model.state_dict().items():
        assert torch.equal(value, start[name]), name
    _fit(ImageClassifier(_ConvBn(), adaptive_clip_factor=0.01, warmup_epochs=0), torch.randn(4, 1, 6, 6),
         torch.arange(4) % 3)


# --------------------------------------------------------------------------------------------------
# Resume of a run saved before these keys
# --------------------------------------------------------------------------------------------------
_NEW_TASK_KEYS = ("mix_switch_prob", "mix_mode", "cutmix_minmax", "mixup_off_epoch", "ema_warmup", "ema_buffers",
                  "layer_decay_min_scale", "layer_decay_no_opt_scale")


def test_a_checkpoint_without_the_new_task_keys_resumes_and_loads(tmp_path):
    """A last.ckpt written before these task keys existed (its stored zoo_config and hyper-parameters lack them)
    resumes under today's config with the defaults, and continues to the uninterrupted run's weights; Lightning's
    load_from_checkpoint of it builds the module with the defaults."""
    options = [*FAST_RUN, "test=false", "export=false", "trainer.max_epochs=2", "trainer.limit_train_batches=2",
               "data.batch_size=16", "task.ema_decay=0.9"]
    straight = run.train(run.compose([*options, f"run_dir={tmp_path / 'straight'}"]))
    part = run.train(run.compose([*options, f"run_dir={tmp_path / 'part'}", "+trainer.max_steps=3"]))
    ckpt = torch.load(part["last_ckpt"], weights_only=True)
    hparams = ckpt["hyper_parameters"]
    assert set(_NEW_TASK_KEYS) <= set(hparams["zoo_config"]["task"]) and "adaptive_clip_factor" in hparams
    for key in _NEW_TASK_KEYS:
        del hparams["zoo_config"]["task"][key]
        del hparams[key]
    del hparams["adaptive_clip_factor"]
    torch.save(ckpt, part["last_ckpt"])
    loaded = ImageClassifier.load_from_checkpoint(part["last_ckpt"], weights_only=True)
    assert loaded.mix_mode == "batch" and loaded.model_ema.warmup and loaded.adaptive_clip_factor is None
    resumed = run.train(run.compose([*options, f"run_dir={tmp_path / 'part'}", "+trainer.max_steps=4",
                                     f"ckpt_path={part['last_ckpt']}"]))
    assert resumed["global_step"] == straight["global_step"] == 4
    a = torch.load(straight["last_ckpt"], weights_only=True)["state_dict"]
    b = torch.load(resumed["last_ckpt"], weights_only=True)["state_dict"]
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)


def test_a_resume_with_other_layer_decay_scales_is_refused_by_name(tmp_path):
    """The no-opt scale decides which parameters the optimizer holds, so a resume with another value failed in
    Lightning's optimizer loading ("loaded state dict contains a parameter group that doesn't match the size");
    like task.layer_decay it is refused naming the key, and a checkpoint without the key is read with its default."""
    options = [*FAST_RUN, "test=false", "export=false", "trainer.max_epochs=2", "trainer.limit_train_batches=2",
               "data.batch_size=16", "task.layer_decay=0.5"]
    part = run.train(run.compose([*options, f"run_dir={tmp_path / 'part'}", "+trainer.max_steps=2"]))
    with pytest.raises(ValueError, match=r"cannot resume from .* with task.layer_decay_no_opt_scale=0.2"):
        run.train(run.compose([*options, f"run_dir={tmp_path / 'part'}", "task.layer_decay_no_opt_scale=0.2",
                               f"ckpt_path={part['last_ckpt']}"]))


def test_graph_modules_take_the_ema_and_clipping_options():
    """The graph task modules take ZooModule's EMA and adaptive-clipping options as the vision module does (saved in
    hparams, so a .ckpt records them); they refused them as unknown arguments."""
    from zoo.tasks.graph.lit import GraphTargetsModule, NodeClassificationModule

    for cls in (NodeClassificationModule, GraphTargetsModule):
        module = cls(nn.Linear(4, 3), ema_decay=0.9, ema_warmup=False, ema_buffers="average", adaptive_clip_factor=0.02)
        assert module.model_ema.warmup is False and module.adaptive_clip_factor == 0.02
        assert (module.hparams["ema_warmup"], module.hparams["ema_buffers"], module.hparams["adaptive_clip_factor"]) \
            == (False, "average", 0.02)
        default = cls(nn.Linear(4, 3), ema_decay=0.9)
        assert default.model_ema.warmup is True and default.adaptive_clip_factor is None
        with pytest.raises(ValueError, match="ema_buffers must be copy"):
            cls(nn.Linear(4, 3), ema_decay=0.9, ema_buffers="mean")
