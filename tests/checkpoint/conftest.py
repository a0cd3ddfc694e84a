import pytest

from ..models import tiny_qwen3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The small Qwen3 saved as a bf16 Hugging Face folder."""
    folder = tmp_path_factory.mktemp("bf16")
    tiny_qwen3().save_pretrained(folder)
    return folder
