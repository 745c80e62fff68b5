"""The exact and analytic family: what the update gives away without optimisation. Analytic
recovery of a linear layer's input and the labels (``analytic``, ``labels``); SPEAR's exact batch
recovery and the Cocktail Party Attack's unmixing (``spear``, ``cpa``), registered in
``attacks.ATTACKS`` as ``spear`` and ``cpa``."""

from gradleak.attacks.base import ATTACKS
from gradleak.attacks.exact.batch import CocktailParty, Spear

ATTACKS.register("spear")(Spear)
ATTACKS.register("cpa")(CocktailParty)

__all__ = ["CocktailParty", "Spear"]
