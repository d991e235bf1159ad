"""ONNX export and ONNX Runtime verification (installed as ``mmts_fast.export``)."""
from mmts_fast.export.onnx import check_graph, export_onnx, verify_onnx

__all__ = ["check_graph", "export_onnx", "verify_onnx"]
