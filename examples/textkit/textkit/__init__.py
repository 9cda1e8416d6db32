"""Small string helpers."""

from textkit.strings import farewell, greet, reverse_words, shout, word_count

__all__ = ["farewell", "greet", "reverse_words", "shout", "word_count"]
