"""The settings every config section shares: unknown keys are errors, values are frozen, and
floats must be finite (an infinite learning rate or a NaN threshold is a typo, never a setting)."""

from __future__ import annotations

from pydantic import ConfigDict

SECTION = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
