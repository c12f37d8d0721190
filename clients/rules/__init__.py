"""The framework of the sites' local rules (:mod:`.base`, :mod:`.ala`); each method's own rule
lives in its module under ``methods/``."""
