"""Data stage: sources → tokenizer → packed token cache → batch loader."""
from pipeline.data.cache import DataSettings, PreparedData, bits_per_byte, prepare

__all__ = ["DataSettings", "PreparedData", "bits_per_byte", "prepare"]
