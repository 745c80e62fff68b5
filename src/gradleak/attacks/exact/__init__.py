"""The exact and analytic family: what the update gives away without optimisation (a linear layer's
input, the labels from the classifier layer)."""
