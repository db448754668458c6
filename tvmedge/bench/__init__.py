"""Latency measurement of the peers (ONNX Runtime, PyTorch eager) on the same inputs and threads."""
