"""Attack settings and the published attacks as named presets of the one engine."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationError

from gradleak.registry import Registry
from gradleak.schema import Section, one_line


class AttackSettings(Section):
    """Everything that distinguishes one gradient-inversion attack from another."""

    # objective
    objective: Literal["l2", "cosine", "l1"] = Field(
        "cosine", description="Distance between the simulated and the real update."
    )
    layer_weights: Literal["equal", "linear"] = Field(
        "equal",
        description="Per-tensor weights of the distance: equal, or linearly decreasing from the "
        "first layer to 0.1 at the last.",
    )
    match_weight: float = Field(
        1.0, ge=0, description="Weight of the update-matching term (0 leaves only the priors)."
    )
    match_schedule: Literal["constant", "cosine"] = Field(
        "constant",
        description="constant: the matching weight throughout; cosine: it decays to 0 over the "
        "iterations, so that the priors alone settle the last steps.",
    )
    relu_surrogate: float = Field(
        0.0,
        ge=0,
        description="Sharpness beta of the surrogate second derivative of ReLU in the replay "
        "(the derivative of sigmoid(beta*u) in place of 0); the simulated update stays exact. 0: "
        "off.",
    )
    # priors
    tv: float = Field(0.0, ge=0, description="Total-variation weight.")
    tv_kind: Literal["l1", "l2"] = Field(
        "l1", description="Anisotropic L1 or squared L2 total variation."
    )
    l2: float = Field(0.0, ge=0, description="Weight of the mean squared (normalised) pixel value.")
    bn: float = Field(
        0.0,
        ge=0,
        description="Weight of the batch-norm statistics term (needs batch-norm layers that ran in "
        "train mode; see bn_if_revealed): per layer l, decay^l * (|mean - mean*| + |var - "
        "var*|), where * is what the update's running-statistic deltas reveal (the "
        "momentum-weighted mean of the client's per-step batch statistics) and the replay's "
        "statistics are weighted alike.",
    )
    bn_if_revealed: bool = Field(
        False,
        description="Apply the batch-norm statistics term only where the update reveals "
        "statistics (batch-norm layers run in train mode, and their running statistics moved) and "
        "drop it elsewhere (no batch-norm layers, eval mode, statistics withheld by a defence), "
        "instead of refusing such updates.",
    )
    bn_normalize: bool = Field(
        False,
        description="Divide each layer's two distances by |std*| and |var*|, so that every layer "
        "weighs alike whatever the scale of its activations (false: NVFlare's GradInversion term).",
    )
    bn_layer_decay: float = Field(
        1.0,
        gt=0,
        le=1,
        description="decay of the batch-norm term: layer l (in the model's order) weighs "
        "decay^l. Early layers see small patches and pin the image at small batches; deep layers' "
        "statistics are slow to fit and, weighed equally, stall the optimisation.",
    )
    features: float = Field(
        0.0,
        ge=0,
        description="Weight of feature inversion: the classifier's input of every image, recovered "
        "exactly from its weight and bias gradients when the update is one step (one image; or a "
        "batch with known or recovered labels, where the solve is well posed: see "
        "attacks/exact/analytic.py), matched as |f - f*|^2 / |f*|^2 over the batch. Ignored where "
        "the update does not reveal it.",
    )
    init: Literal["noise", "uniform", "constant", "prior"] = Field(
        "noise",
        description="Start from standard normal noise in the normalised space, uniform pixels, the "
        "dataset mean colour, or a prior image.",
    )
    init_noise: float = Field(
        0.1,
        ge=0,
        description="Std of Gaussian noise (normalised units) added to constant and prior starts; "
        "a flat start gives batch-norm layers no variance and the images no gradient.",
    )
    # optimisation
    scales: int = Field(
        0,
        ge=0,
        le=6,
        description="Coarser levels in the image parameterisation: the image is the sum of a "
        "full-resolution image and images at 1/2, 1/4, ... resolution, upsampled, so that coarse "
        "structure "
        "moves as fast as pixel detail (0: pixels only).",
    )
    optimizer: Literal["adam", "lbfgs"] = Field(
        "adam", description="Optimiser of the images (and soft labels)."
    )
    lr: float = Field(0.1, gt=0, description="Learning rate.")
    signed: bool = Field(
        False, description="Adam on the sign of the gradient (Inverting Gradients)."
    )
    iterations: int = Field(1000, gt=0, description="Optimisation steps (L-BFGS: outer steps).")
    schedule: Literal["none", "step", "cosine"] = Field(
        "none",
        description="step: x0.1 at 3/8, 5/8 and 7/8 of the iterations; cosine: decay to 0 after a "
        "warm-up.",
    )
    warmup: int = Field(0, ge=0, description="Linear warm-up iterations of the cosine schedule.")
    boxed: bool = Field(True, description="Keep pixels in [0, 1] after every step.")
    restarts: int = Field(
        1,
        gt=0,
        description="Independent starts, run as one batch; the one with the lowest final objective "
        "wins.",
    )
    labels: Literal["known", "analytic", "optimize"] = Field(
        "analytic",
        description="known: the server knows the labels; analytic: recover them from the last "
        "layer; optimize: soft labels optimised jointly.",
    )
    unroll: Literal["auto", "always", "never"] = Field(
        "auto",
        description="Simulate the client's local SGD steps (auto: when the update took more than "
        "one step).",
    )
    conv_backend: Literal["auto", "onednn", "native"] = Field(
        "auto",
        description="CPU convolutions: oneDNN, PyTorch's native kernels, or auto (oneDNN when the "
        "model's convolutions are large enough to amortise its per-call overhead; see "
        "attacks/engine.py).",
    )


PRESETS: Registry[AttackSettings] = Registry("attack preset")

PRESETS.register("dlg")(
    AttackSettings(
        objective="l2",
        optimizer="lbfgs",
        lr=1.0,
        iterations=300,
        labels="optimize",
        init="uniform",
        boxed=False,
    )
)  # Zhu et al., "Deep Leakage from Gradients", NeurIPS 2019.
PRESETS.register("idlg")(
    AttackSettings(
        objective="l2",
        optimizer="lbfgs",
        lr=1.0,
        iterations=300,
        labels="analytic",
        init="uniform",
        boxed=False,
    )
)  # Zhao et al., "iDLG: Improved Deep Leakage from Gradients", 2020: DLG with the analytic label.
PRESETS.register("inverting-gradients")(
    AttackSettings(
        objective="cosine",
        tv=1e-2,
        optimizer="adam",
        signed=True,
        lr=0.1,
        iterations=4800,
        schedule="step",
        boxed=True,
        restarts=1,
        labels="analytic",
        init="noise",
        bn=0.1,
        bn_normalize=True,
        bn_if_revealed=True,
        features=1.0,
    )
)  # Geiping et al., "Inverting Gradients", NeurIPS 2020 (their 'config 2': 4,800 steps, TV 1e-2),
# plus two things the update reveals exactly where it reveals them, so that the audit runs the
# strongest form of the attack: the batch-norm statistics of a train-mode update, and the
# classifier's inputs of a one-step update (one image, or a batch with known or recovered labels).
# Where neither is revealed (several steps, eval-mode batch norm, no batch norm) it is the paper's
# attack. benchmarks/attacks.py batch4-eval and batch4-train measure both additions against
# inversefed's own loop on a 4-image batch.
PRESETS.register("gradinversion")(
    AttackSettings(
        objective="l2",
        match_weight=0.1,
        match_schedule="cosine",
        relu_surrogate=3.0,
        bn=0.1,
        tv=1e-4,
        tv_kind="l2",
        l2=1e-5,
        optimizer="adam",
        lr=0.1,
        iterations=2000,
        schedule="cosine",
        warmup=50,
        boxed=True,
        labels="analytic",
        init="prior",
    )
)
# Yin et al., "See through Gradients", CVPR 2021, with the prior weights of NVFlare's GradInversion
# config (Hatamizadeh et al.): batch-norm 0.1, TV-L2 1e-4, L2 1e-5. The matching term differs from
# NVFlare's (1e-3 on per-tensor norms, from detached tensors): weight 0.1 on the squared
# pseudo-gradient, ReLU's second derivative by a surrogate (attacks/surrogate.py) and the weight
# decayed to 0 by a cosine. At batch size 1, batch norm makes the conv gradients chaotic in the
# image
# (1e-3 pixel noise moves them by 30-70% on a flat tile): plain matching then only hurts, while the
# smoothed, decaying term places the coarse structure and leaves the fine steps to the batch-norm
# prior (benchmarks/attacks.py gradinversion).

PRESETS.register("bn-statistics")(
    AttackSettings(
        match_weight=0.0,
        bn=0.1,
        bn_normalize=True,
        bn_layer_decay=0.85,
        tv=1e-4,
        tv_kind="l2",
        l2=1e-5,
        scales=3,
        optimizer="adam",
        lr=0.1,
        iterations=1000,
        schedule="cosine",
        warmup=50,
        boxed=True,
        restarts=4,
        labels="analytic",
        init="prior",
    )
)  # For batch-norm networks whose clients train in train mode (the ResNets of Hatamizadeh et al.):
# the images are fitted to the batch statistics that the update's running-statistic deltas reveal
# (every layer, every local step, momentum-weighted as the client's buffers were), as DeepInversion
# fits a network's statistics and GradInversion uses them as a prior. Measured on a one-image
# resnet18 update (benchmarks/attacks.py gradinversion): per-layer normalisation and a decay of 0.85
# per layer (early layers, which see small patches, pin the image; equal weights stall on the deep
# ones), a coarse-to-fine parameterisation (3 scales) and 4 restarts chosen by the final objective
# each help. The update-matching term is off: with train-mode batch norm at batch size 1 every conv
# and batch-norm weight gradient is chaotic in the image (1e-3 pixel noise moves it by 22-41%), and
# adding it cost 16 dB; in eval mode there are no statistics, use inverting-gradients.

PRESET_SOURCES = {
    "dlg": "Zhu, Liu, Han: Deep Leakage from Gradients (NeurIPS 2019)",
    "idlg": "Zhao, Mopuri, Bilen: iDLG: Improved Deep Leakage from Gradients (2020)",
    "inverting-gradients": "Geiping, Bauermeister, Droege, Moeller: Inverting Gradients (NeurIPS "
    "2020)",
    "gradinversion": "Yin et al.: See through Gradients (CVPR 2021); NVFlare's GradInversion "
    "(Hatamizadeh et al., TMI 2023)",
    "bn-statistics": "the batch statistics a train-mode update reveals, inverted as in Yin et al.: "
    "Dreaming "
    "to Distill (DeepInversion, CVPR 2020), the prior of GradInversion (CVPR 2021)",
}


# What makes an attack match the update, taken from inverting-gradients when an attack that matched
# only the batch-norm statistics finds them withheld.
MATCHING_SETTINGS = (
    "objective",
    "layer_weights",
    "match_weight",
    "match_schedule",
    "relu_surrogate",
    "tv",
    "tv_kind",
    "l2",
    "scales",
    "optimizer",
    "lr",
    "signed",
    "schedule",
    "warmup",
)


def without_statistics(settings: AttackSettings) -> AttackSettings:
    """The settings for an update whose batch-norm statistics were withheld: the statistics term
    off, and, where nothing else tied the images to the update, Inverting Gradients' matching
    (objective, priors, optimiser, schedule) in its place; iterations, restarts, start and labels
    stay as they were."""
    if settings.bn == 0:
        return settings
    if settings.match_weight > 0 or settings.features > 0:
        return settings.model_copy(update={"bn": 0.0})
    ig = PRESETS.get("inverting-gradients")
    return settings.model_copy(update={"bn": 0.0, **{k: getattr(ig, k) for k in MATCHING_SETTINGS}})


def preset(name: str, **overrides: object) -> AttackSettings:
    """A named preset, optionally with some settings changed."""
    base = PRESETS.get(name, key="attack.preset")
    if not overrides:
        return base
    try:
        return AttackSettings.model_validate({**base.model_dump(), **overrides})
    except ValidationError as exc:
        raise one_line(exc, "attack") from None
