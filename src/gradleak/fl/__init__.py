"""Federated learning: client local training, server aggregation, the in-process simulator."""

from gradleak.fl.client import LocalTraining, train_client
from gradleak.fl.filters import FilterContext, UpdateFilter
from gradleak.fl.server import STRATEGIES, FedAvg, Strategy, evaluate
from gradleak.fl.simulator import ClientResult, RoundResult, Simulator
from gradleak.fl.update import ClientUpdate, UpdateMeta

__all__ = [
    "STRATEGIES",
    "ClientResult",
    "ClientUpdate",
    "FedAvg",
    "FilterContext",
    "LocalTraining",
    "RoundResult",
    "Simulator",
    "Strategy",
    "UpdateFilter",
    "UpdateMeta",
    "evaluate",
    "train_client",
]
