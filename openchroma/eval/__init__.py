"""Evaluation tools: the paper's objective measurements (``openchroma eval``) and a blind listening test
(``openchroma listen``).

This package is a client of the engine (``openchroma.engine``) and of third-party scoring models; nothing in the
engine or the models depends on it.
"""
