"""Federated learning: client local training, server aggregation, tasks, the in-process
simulator."""

from gradleak.fl.client import LocalTraining, train_client
from gradleak.fl.filters import FilterContext, Filtered, UpdateFilter
from gradleak.fl.server import STRATEGIES, FedAvg, Strategy, evaluate
from gradleak.fl.simulator import ClientResult, RoundResult, Simulator
from gradleak.fl.tasks import Classification
from gradleak.fl.update import ClientUpdate, UpdateMeta

__all__ = [
    "STRATEGIES",
    "Classification",
    "ClientResult",
    "ClientUpdate",
    "FedAvg",
    "FilterContext",
    "Filtered",
    "LocalTraining",
    "RoundResult",
    "Simulator",
    "Strategy",
    "UpdateFilter",
    "UpdateMeta",
    "evaluate",
    "train_client",
]
