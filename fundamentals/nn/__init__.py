"""Layers and containers on the from-scratch autograd (`fundamentals.autograd`)."""

from fundamentals.nn.modules import Dropout, Embedding, LayerNorm, Linear, Module, ReLU, Sequential, Tanh, parameter

__all__ = ["Dropout", "Embedding", "LayerNorm", "Linear", "Module", "ReLU", "Sequential", "Tanh", "parameter"]
