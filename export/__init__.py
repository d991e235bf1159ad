"""ONNX export and ONNX Runtime verification (installed as ``mmts_fast.export``)."""
