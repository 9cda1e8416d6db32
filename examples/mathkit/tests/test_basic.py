from mathkit import add, is_even, multiply, square, subtract


def test_subtract():
    assert subtract(5, 3) == 2
    assert subtract(3, 5) == -2


def test_multiply():
    assert multiply(4, 3) == 12
    assert multiply(-2, 3) == -6


def test_square():
    assert square(7) == 49
    assert square(-3) == 9


def test_add():
    assert add(2, 3) == 5
    assert add(0, 0) == 0


def test_add_negative():
    assert add(-4, 1) == -3


def test_is_even():
    assert is_even(4) is True
    assert is_even(7) is False


def test_is_even_zero_and_negative():
    assert is_even(0) is True
    assert is_even(-3) is False
