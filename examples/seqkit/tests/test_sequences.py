from seqkit import chunk, fibonacci, run_length_encode, running_total


def test_running_total():
    assert running_total([1, 2, 3]) == [1, 3, 6]
    assert running_total([]) == []


def test_chunk():
    assert chunk([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]
    assert chunk([], 3) == []


def test_fibonacci_small():
    assert [fibonacci(n) for n in range(8)] == [0, 1, 1, 2, 3, 5, 8, 13]


def test_fibonacci_ten():
    assert fibonacci(10) == 55


def test_run_length_encode():
    assert run_length_encode("aaabcc") == "a3b1c2"


def test_run_length_encode_edges():
    assert run_length_encode("") == ""
    assert run_length_encode("z") == "z1"
    assert run_length_encode("abba") == "a1b2a1"
