"""Benchmarks against the PyTorch reference (`run`) and analytic FLOP counts / MFU (`flops`)."""
