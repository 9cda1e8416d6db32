"""Small integer arithmetic helpers."""

from mathkit.basic import add, is_even, multiply, square, subtract

__all__ = ["add", "is_even", "multiply", "square", "subtract"]
