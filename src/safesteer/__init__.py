"""safesteer: activation steering and switching that make chat models refuse what they should."""

__version__ = "0.1.0"
