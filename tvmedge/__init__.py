"""tvmedge: import, compress, autotune and deploy models for edge devices on Apache TVM (Relax)."""

__version__ = "0.1.0"
