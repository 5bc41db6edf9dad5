"""pegq: quantize transformer encoders despite their activation outliers."""

__version__ = "0.1.0"
