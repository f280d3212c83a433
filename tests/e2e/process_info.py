"""Process inspection for the tests: the library's own (mmfuse.processes)."""
from mmfuse.processes import STUB, Stub, children, memory, rss_bytes, state, stubs, zombies  # noqa: F401
