"""BoRA Lab: learn, teach and compare parameter-efficient fine-tuning methods."""

__version__ = "0.2.0"
