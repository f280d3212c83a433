"""Triton adapter for python_backends.encoders.ImageEncoder; the logic lives there."""
import triton_python_backend_utils as pb_utils

from python_backends.encoders import ImageEncoder
from python_backends.serving import TritonAdapter


class TritonPythonModel:
    def initialize(self, args):
        self.adapter = TritonAdapter(pb_utils, args, ImageEncoder.from_parameters)

    def execute(self, requests):
        return self.adapter.execute(requests)

    def finalize(self):
        self.adapter.finalize()
