"""Model zoo and the frozen hash encoder, exportable to ONNX for edge devices."""
