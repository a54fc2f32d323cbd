"""Workstation exporter: the models package's nets as parity-checked ONNX and ExecuTorch artifacts for devices."""
