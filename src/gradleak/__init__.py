"""gradleak: measure how much private training data leaks from federated-learning updates."""

__version__ = "0.1.0"
