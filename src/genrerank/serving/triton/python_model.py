"""Triton Python-backend model that runs a genrerank ``model.onnx`` with ONNX Runtime.

The CPU stand-in for ``platform: "onnxruntime_onnx"`` (see
:mod:`genrerank.serving.triton.repository`): copied as ``<model>/1/model.py`` by
``write_repository(..., backend="python")`` and executed by Triton's Python-backend stub, not by
genrerank. It therefore imports nothing from genrerank, and it does what the ONNX Runtime
backend does for a batched model: the requests Triton's dynamic batcher hands over together are
concatenated along the batch dimension, run in one session call, and split back.

The stub embeds the system's libpython and ignores ``PYTHONPATH``; the launcher
(:mod:`genrerank.serving.triton.launcher`) names the service's site-packages in
``GENRERANK_STUB_SITE`` and they are added here before numpy and onnxruntime are imported.
"""

import json
import os
import site

for _dir in os.environ.get("GENRERANK_STUB_SITE", "").split(os.pathsep):
    if _dir:
        site.addsitedir(_dir)

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_threads", "1"))
        options.inter_op_num_threads = 1
        # No spinning: the stub shares the cores with tritonserver and the service.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.inputs = [i["name"] for i in config["input"]]
        # A per-row scalar is declared dims [1] + reshape []: the graph wants [batch].
        self.flat = {i["name"] for i in config["input"] if "reshape" in i}
        self.outputs = [o["name"] for o in config["output"]]

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        feeds_of = []
        for idx, request in enumerate(requests):
            feeds = {}
            for name in self.inputs:
                # Through DLPack, not Tensor.as_numpy(): the stub's pybind11 numpy bridge
                # predates numpy 2 and reads wrong bytes with it (values differed from what the
                # client sent); np.from_dlpack reads the tensor's own buffer.
                value = np.from_dlpack(pb_utils.get_input_tensor_by_name(request, name))
                feeds[name] = value.reshape(-1) if name in self.flat else value
            feeds_of.append(feeds)
            # Only requests whose non-batch shapes agree can be stacked.
            key = tuple((k, v.shape[1:]) for k, v in sorted(feeds.items()))
            groups.setdefault(key, []).append(idx)
        for members in groups.values():
            rows = [feeds_of[i][self.inputs[0]].shape[0] for i in members]
            stacked = {name: np.concatenate([feeds_of[i][name] for i in members])
                       for name in self.inputs}
            try:
                results = self.session.run(self.outputs, stacked)
            except Exception as exc:  # one bad group must not take the others down
                error = pb_utils.TritonError(f"onnxruntime: {exc}")
                for i in members:
                    responses[i] = pb_utils.InferenceResponse(output_tensors=[], error=error)
                continue
            start = 0
            for i, count in zip(members, rows, strict=True):
                # from_dlpack for the same reason: Tensor(name, ndarray) sends an empty buffer
                # with numpy 2.
                tensors = [pb_utils.Tensor.from_dlpack(
                    name, np.ascontiguousarray(out[start:start + count]))
                    for name, out in zip(self.outputs, results, strict=True)]
                responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
                start += count
        return responses
