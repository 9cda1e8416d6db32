from textkit import farewell, greet, reverse_words, shout, word_count


def test_shout():
    assert shout("hello") == "HELLO!"


def test_word_count():
    assert word_count("the quick  brown fox") == 4
    assert word_count("") == 0


def test_farewell():
    assert farewell("Ada") == "Goodbye, Ada!"


def test_greet():
    assert greet("Ada") == "Hello, Ada!"


def test_greet_other_name():
    assert greet("Grace Hopper") == "Hello, Grace Hopper!"


def test_reverse_words():
    assert reverse_words("one two  three") == "three two one"


def test_reverse_words_single_and_empty():
    assert reverse_words("solo") == "solo"
    assert reverse_words("") == ""
