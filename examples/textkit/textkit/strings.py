"""Functions that build and reshape short strings."""


def shout(text: str) -> str:
    """Return `text` in upper case followed by an exclamation mark.

    >>> shout("hello")
    'HELLO!'
    """
    return text.upper() + "!"


def word_count(text: str) -> int:
    """Return the number of whitespace-separated words in `text`.

    >>> word_count("the quick  brown fox")
    4
    """
    return len(text.split())


def farewell(name: str) -> str:
    """Return a farewell for `name`: "Goodbye, " then the name, then "!".

    >>> farewell("Ada")
    'Goodbye, Ada!'
    """
    return f"Goodbye, {name}!"


def greet(name: str) -> str:
    """Return a greeting for `name`: "Hello, " then the name, then "!".

    >>> greet("Ada")
    'Hello, Ada!'
    """
    raise NotImplementedError


def reverse_words(text: str) -> str:
    """Return the words of `text` in reverse order, joined by single spaces.

    >>> reverse_words("one two  three")
    'three two one'
    """
    raise NotImplementedError
