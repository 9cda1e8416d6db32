"""Functions that build or transform sequences."""


def running_total(values: list[int]) -> list[int]:
    """Return the cumulative sums of `values`.

    >>> running_total([1, 2, 3])
    [1, 3, 6]
    """
    totals = []
    total = 0
    for value in values:
        total += value
        totals.append(total)
    return totals


def chunk(values: list[int], size: int) -> list[list[int]]:
    """Split `values` into consecutive lists of `size` items; the last may be shorter.

    >>> chunk([1, 2, 3, 4, 5], 2)
    [[1, 2], [3, 4], [5]]
    """
    return [values[i : i + size] for i in range(0, len(values), size)]


def fibonacci(n: int) -> int:
    """Return the `n`-th Fibonacci number, where fibonacci(0) is 0 and fibonacci(1) is 1.

    >>> fibonacci(10)
    55
    """
    raise NotImplementedError


def run_length_encode(text: str) -> str:
    """Return `text` with each run of a repeated character written as the character and the
    length of the run.

    >>> run_length_encode("aaabcc")
    'a3b1c2'
    """
    raise NotImplementedError
