"""The ``mmfuse`` Triton backend: the one model.py of every mmfuse Python model.

Triton runs it for every model whose config.pbtxt says ``backend: "mmfuse"`` (a Python-based backend:
``<backend directory>/mmfuse/model.py``, next to the ``python`` backend it runs on). The handler a model
runs is named in its config.pbtxt (parameter ``handler``); all the work is in mmfuse.serving.adapter.
"""
import triton_python_backend_utils as pb_utils

from mmfuse.serving.adapter import TritonAdapter


class TritonPythonModel:
    def initialize(self, args):
        self.adapter = TritonAdapter(pb_utils, args)

    def execute(self, requests):
        return self.adapter.execute(requests)

    def finalize(self):
        self.adapter.finalize()
