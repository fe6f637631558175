"""Recurrent networks written out: an Elman RNN, an LSTM, and a character-level LSTM language model."""

from fundamentals.rnn.cells import LSTM, RNN, lstm_cell, rnn_cell

__all__ = ["LSTM", "RNN", "lstm_cell", "rnn_cell"]
