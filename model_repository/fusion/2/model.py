"""Triton adapter for python_backends.fusion.FusionHandler; the logic lives there."""
import triton_python_backend_utils as pb_utils

from python_backends.fusion import FusionHandler
from python_backends.serving import TritonAdapter


class TritonPythonModel:
    def initialize(self, args):
        self.adapter = TritonAdapter(pb_utils, args, FusionHandler.from_parameters)

    def execute(self, requests):
        return self.adapter.execute(requests)

    def finalize(self):
        self.adapter.finalize()
