"""Triton adapter for python_backends.tabular.TabularEncoder; the logic lives there."""
import triton_python_backend_utils as pb_utils

from python_backends.serving import TritonAdapter
from python_backends.tabular import TabularEncoder


class TritonPythonModel:
    def initialize(self, args):
        self.adapter = TritonAdapter(pb_utils, args, TabularEncoder.from_parameters)

    def execute(self, requests):
        return self.adapter.execute(requests)

    def finalize(self):
        self.adapter.finalize()
