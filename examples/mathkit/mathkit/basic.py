"""Basic arithmetic on integers."""


def subtract(a: int, b: int) -> int:
    """Return `a` minus `b`.

    >>> subtract(5, 3)
    2
    """
    return a - b


def multiply(a: int, b: int) -> int:
    """Return the product of `a` and `b`.

    >>> multiply(4, 3)
    12
    """
    return a * b


def square(x: int) -> int:
    """Return `x` multiplied by itself.

    >>> square(7)
    49
    """
    return x * x


def add(a: int, b: int) -> int:
    """Return the sum of `a` and `b`.

    >>> add(2, 3)
    5
    """
    raise NotImplementedError


def is_even(n: int) -> bool:
    """Return True when `n` is divisible by 2, else False.

    >>> is_even(4)
    True
    >>> is_even(7)
    False
    """
    raise NotImplementedError
