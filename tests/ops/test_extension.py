"""The compiled extension: registration, and the errors users see when it is broken."""

import importlib

import pytest
import torch

import llama_fast as lf
from llama_fast.ops import _extension


def test_ops_registered_under_torch_ops():
    assert hasattr(torch.ops.llama_fast, "kfac_factors")
    schema = str(torch.ops.llama_fast.kfac_factors.default._schema)
    assert schema.startswith("llama_fast::kfac_factors(Tensor[] a, Tensor[] g, bool[] bias")


def test_cuda_kernels_built_when_torch_has_cuda():
    # setup.py builds the CUDA kernels whenever torch is a CUDA build and nvcc is found;
    # LLAMA_FAST_CUDA=0 is the only way to opt out, and CI never sets it.
    info = importlib.import_module("llama_fast._build_info")
    assert info.TORCH_VERSION.split("+")[0] == torch.__version__.split("+")[0]
    if torch.version.cuda is not None and _extension.cuda_kernels_built():
        assert torch._C._dispatch_has_kernel_for_dispatch_key("llama_fast::kfac_factors", "CUDA")


def test_version_mismatch_names_both_versions(monkeypatch):
    info = importlib.import_module("llama_fast._build_info")
    monkeypatch.setattr(info, "TORCH_VERSION", "1.13.0+cu117")
    with pytest.raises(ImportError, match=r"built against torch 1\.13\.0\+cu117 but torch .* is running"):
        _extension.load()


@pytest.fixture
def without_extension(monkeypatch):
    """Importing llama_fast._C fails, as it does where the extension was never built."""
    real_import = importlib.import_module

    def fake_import(name, *args):
        if name == "llama_fast._C":
            raise ImportError("No module named 'llama_fast._C'")
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", fake_import)


def test_missing_extension_is_a_clear_import_error(without_extension):
    with pytest.raises(ImportError, match=r"could not be loaded.*pip install --no-build-isolation"):
        _extension.load()


def test_public_names():
    assert callable(lf.kfac_factors) and callable(lf.reference.kfac_factors)


def test_checkout_without_a_build_says_what_to_do(monkeypatch, tmp_path, without_extension):
    """Importing a source checkout that holds no compiled extension (e.g. running pytest from
    the checkout after a non-editable `pip install .`) names the checkout and the two ways out."""
    (tmp_path / "csrc").mkdir()
    (tmp_path / "setup.py").write_text("")
    (tmp_path / "llama_fast").mkdir()
    monkeypatch.setattr(_extension, "PACKAGE", tmp_path / "llama_fast")
    with pytest.raises(ImportError, match=r"source checkout .*pip install -e \.") as err:
        _extension.load()
    assert str(tmp_path / "llama_fast") in str(err.value) and "another directory" in str(err.value)
