"""The data directory: its files, how they are read and validated, and a synthetic generator."""
