"""The model on NVIDIA Triton Inference Server, the re-ranking logic in the genrerank service.

- :mod:`~genrerank.serving.triton.repository`: ``genrerank export --triton REPO`` writes a Triton
  model repository from an ONNX export (item tower + per-request graph) and validates it offline
  against Triton's own ``model_config`` protobuf and the ONNX graphs.
- :mod:`~genrerank.serving.triton.backend`: :class:`TritonBackend`, the runtime backend that
  calls those models over gRPC (``genrerank serve --model-server URL``).
- :mod:`~genrerank.serving.triton.launcher`: starts a real ``tritonserver`` process on a CPU
  machine (the binary of the ``nvidia-pytriton`` wheel, Python backend) for tests and benchmarks.

Heavy imports (tritonclient, onnx) happen inside functions, so importing this package is cheap.
"""
