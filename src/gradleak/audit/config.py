"""The audit's settings (the ``audit:`` section of an experiment)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from gradleak.attacks.base import ADAPTIVE, Attack
from gradleak.schema import Section


class AuditConfig(Section):
    """Attack the updates an honest-but-curious server receives, measure RDLV, optionally gate."""

    clients: list[int] | Literal["all"] = Field("all", description="Client ids to audit, or all.")
    start_round: int = Field(1, gt=0, description="First audited round.")
    frequency: int = Field(1, gt=0, description="Audit every k-th round from start_round.")
    preset: str = Field(
        "inverting-gradients",
        description="The attack, by name: an optimisation preset (dlg, idlg, "
        "inverting-gradients, gradinversion, bn-statistics; see the attack settings) or another "
        "registered attack.",
    )
    attack: dict[str, Any] = Field(
        default_factory=lambda: {"iterations": 300},
        description="Changes to the attack's settings, e.g. {iterations: 300}.",
    )
    also: list[str] = Field(
        default_factory=list,
        description="Further attacks, by name, run with their own defaults on every audited update "
        "where they "
        "apply (e.g. [spear, cpa], the exact batch attacks); the row records each one's RDLV "
        "(rdlv_by_attack) "
        "and the worst, with the attack that reached it.",
    )
    adaptive: bool = Field(
        True,
        description="When a defence is on, also run each attack's counterpart that knows the "
        "defences (NAME-adaptive, where one is registered: the optimisation presets), with the "
        "same settings; the row records both in rdlv_by_attack and keeps the worst. A defence "
        "holds only if both stay under the level.",
    )
    prior: str = Field(
        "mean-image",
        description="What the server would guess without the update, the baseline of RDLV (and the "
        "start "
        "of presets with init=prior). Images: mean-image (the test split's mean image, public data "
        "on the "
        "server) or none (the dataset's mean colour). Text: unigram (the test split's most "
        "frequent tokens) or positional (its most frequent token at each position).",
    )
    metric: str = Field(
        "ssim",
        description="Similarity S of the RDLV, one of the data's metrics (images: ssim, psnr or "
        "mse; text: exact, rouge1, rouge2, rougeL, token_precision, token_recall, personal).",
    )
    reduce: Literal["max", "min"] = Field("max", description="A client's RDLV over its images.")
    threshold: float | None = Field(
        None, description="Withhold an update from aggregation when its RDLV exceeds this."
    )
    save_images: bool = Field(
        True, description="Write originals, starts and reconstructions (npz, PNG)."
    )

    @model_validator(mode="after")
    def _valid_attack(self) -> AuditConfig:
        self.build_attack()  # raises ConfigError naming the bad key
        self.build_others()
        return self

    def build_attack(self) -> Attack:
        """The configured attack (its settings changed by ``attack``)."""
        from gradleak.attacks.registry import attack_factory

        return attack_factory(self.preset)(**self.attack)

    def build_others(self) -> dict[str, Attack]:
        """The further attacks of ``also``, by name, with their defaults."""
        from gradleak.attacks.registry import attack_factory

        return {n: attack_factory(n, key="audit.also")() for n in self.also if n != self.preset}

    def build_adaptive(self) -> dict[str, tuple[str, Attack]]:
        """Per attack (the configured one and ``also``), its adaptive counterpart: (its name, the
        attack), the configured one's with the same ``attack`` changes; attacks without one, or
        that are adaptive themselves, are left out."""
        from gradleak.attacks.base import ATTACKS
        from gradleak.attacks.registry import attack_factory, load_attacks

        load_attacks()
        out: dict[str, tuple[str, Attack]] = {}
        for name in [self.preset, *self.also]:
            counterpart = f"{name}{ADAPTIVE}"
            if name.endswith(ADAPTIVE) or counterpart not in ATTACKS or name in out:
                continue
            settings = self.attack if name == self.preset else {}
            out[name] = (counterpart, attack_factory(counterpart)(**settings))
        return out

    def applies(self, round: int, client_id: int) -> bool:
        if self.clients != "all" and client_id not in self.clients:
            return False
        return round >= self.start_round and (round - self.start_round) % self.frequency == 0
