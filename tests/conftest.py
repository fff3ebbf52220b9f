import os

# Triton kernels run on CPU tensors through the interpreter when no GPU is visible. The variable must be
# set before triton decorates the kernels, i.e. before dynattn.triton is imported.
def _gpu_visible() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


if not _gpu_visible():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from _utils import backend_device, backend_skip_reason  # noqa: E402

ALL_BACKENDS = ("reference", "cpu", "triton", "cuda")


@pytest.fixture(params=ALL_BACKENDS)
def backend(request):
    """Every backend; skipped with the reason when it cannot run in this process."""
    reason = backend_skip_reason(request.param)
    if reason:
        pytest.skip(reason)
    return request.param


@pytest.fixture
def device(backend):
    return backend_device(backend)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
