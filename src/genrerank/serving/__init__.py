"""Production serving: ONNX export, item-embedding cache, runtime and the HTTP service."""
