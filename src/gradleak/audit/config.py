"""The audit's settings (the ``audit:`` section of an experiment)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from gradleak.attacks.settings import AttackSettings, preset
from gradleak.schema import Section


class AuditConfig(Section):
    """Attack the updates an honest-but-curious server receives, measure RDLV, optionally gate."""

    clients: list[int] | Literal["all"] = Field("all", description="Client ids to audit, or all.")
    start_round: int = Field(1, gt=0, description="First audited round.")
    frequency: int = Field(1, gt=0, description="Audit every k-th round from start_round.")
    preset: str = Field("inverting-gradients", description="Attack preset (see the attack settings).")
    attack: dict[str, Any] = Field(
        default_factory=lambda: {"iterations": 300},
        description="Changes to the preset's settings, e.g. {iterations: 300}.",
    )
    prior: Literal["mean-image", "none"] = Field(
        "mean-image",
        description="Start image for presets with init=prior: the test split's mean image "
        "(public data on the server), or none (the mean colour).",
    )
    metric: Literal["ssim", "psnr", "mse"] = Field("ssim", description="Similarity S of the RDLV.")
    reduce: Literal["max", "min"] = Field("max", description="A client's RDLV over its images.")
    threshold: float | None = Field(
        None, description="Withhold an update from aggregation when its RDLV exceeds this."
    )
    save_images: bool = Field(True, description="Write originals, starts and reconstructions (npz, PNG).")

    @model_validator(mode="after")
    def _valid_attack(self) -> AuditConfig:
        self.settings()  # raises ConfigError naming the bad key
        return self

    def settings(self) -> AttackSettings:
        return preset(self.preset, **self.attack)

    def applies(self, round: int, client_id: int) -> bool:
        if self.clients != "all" and client_id not in self.clients:
            return False
        return round >= self.start_round and (round - self.start_round) % self.frequency == 0
