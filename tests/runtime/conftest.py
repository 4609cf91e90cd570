"""The qaicrt test double's fixtures (tests/qaicrt_double/fixtures.py) for the runtime tests."""
from tests.qaicrt_double.fixtures import qaic_device, qaicrt_double  # noqa: F401
