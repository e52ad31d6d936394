"""scripts/check_ptxas.py, the CI guard on each CUDA kernel's ptxas report (no compiler needed):
it passes the real report of the current kernels and fails, with a line naming the kernel and
the limit, on spills, too much static shared memory, too many registers, a block that cannot
fit an SM, and a log without any ptxas lines."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# nvcc 13.0 -O3 -Xptxas -v -gencode arch=compute_90,code=sm_90 on every csrc/cuda/*.cu file
SAMPLE = ROOT / "tests" / "data" / "ptxas_sample.log"


def _load_script():
    spec = importlib.util.spec_from_file_location("check_ptxas", ROOT / "scripts" / "check_ptxas.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


check_ptxas = _load_script()


def _run(tmp_path, capsys, log_text, sources=None):
    log = tmp_path / "build.log"
    log.write_text(log_text)
    argv = [str(log)] + (["--sources", str(sources)] if sources is not None else [])
    code = check_ptxas.main(argv)
    return code, capsys.readouterr().out


def _kernel(name, registers=32, smem=0, stores=0, loads=0, arch="sm_90"):
    """One kernel's ptxas lines as nvcc 13 prints them (name: a plain C++ identifier, taking a float*)."""
    mangled = f"_Z{len(name)}{name}Pf"
    smem_text = f", {smem} bytes smem" if smem else ""
    return (f"ptxas info    : Compiling entry function '{mangled}' for '{arch}'\n"
            f"ptxas info    : Function properties for {mangled}\n"
            f"    0 bytes stack frame, {stores} bytes spill stores, {loads} bytes spill loads\n"
            f"ptxas info    : Used {registers} registers, used 1 barriers{smem_text}\n"
            f"ptxas info    : Compile time = 12.345 ms\n")


@pytest.fixture
def sources(tmp_path):
    """A .cu file declaring the synthetic kernels' block sizes as the real ones do."""
    folder = tmp_path / "cuda"
    folder.mkdir()
    (folder / "k.cu").write_text(
        "constexpr int kThreads = 256;\n"
        "constexpr int kWide = 2 * kThreads;   // 512\n"
        "template <typename T>\n__global__ void __launch_bounds__(kThreads)\n    fine_kernel(T* x) {}\n"
        "__global__ void __launch_bounds__(kWide, 1) wide_kernel(float* x) {}\n")
    return folder


def test_the_real_kernels_pass(tmp_path, capsys):
    code, out = _run(tmp_path, capsys, SAMPLE.read_text())
    assert code == 0, out
    assert "check_ptxas: OK, 14 kernels" in out
    assert "FAIL" not in out and "note:" not in out   # every kernel's block size is known
    rows = {line.split()[0]: line.split() for line in out.splitlines() if "_kernel<" in line}
    # kernel  arch  regs  block  regs x block  smem  stack  spill st/ld (names demangled by c++filt)
    if "gram_grouped_kernel<double>" in rows:
        assert rows["gram_grouped_kernel<double>"][1:] == ["sm_90", "128", "256", "32768", "17408", "0", "0/0"]


def test_parse_reads_every_figure():
    report = check_ptxas.parse_log(SAMPLE.read_text())
    assert len(report.kernels) == 14 and not report.spilling_functions
    gram = next(k for k in report.kernels if "gram_grouped_kernelIdE" in k.mangled)
    assert (gram.arch, gram.registers, gram.smem, gram.stack, gram.spill_stores, gram.spill_loads) == \
        ("sm_90", 128, 17408, 0, 0, 0)


def test_launch_bounds_of_the_sources():
    bounds = check_ptxas.launch_bounds(ROOT / "csrc" / "cuda")
    assert bounds["gram_grouped_kernel"] == [("kfac_factors_kernel", 256)]   # kThreads * kThreads, 16 x 16
    assert all(size is not None for entries in bounds.values() for _, size in entries)


def test_a_spill_fails(tmp_path, capsys, sources):
    code, out = _run(tmp_path, capsys, _kernel("fine_kernel") + _kernel("wide_kernel", stores=8, loads=16),
                     sources)
    assert code == 1
    fails = [line for line in out.splitlines() if "FAIL" in line]
    assert len(fails) == 1 and "wide_kernel" in fails[0]
    assert "spills registers to local memory (8 bytes stores, 16 bytes loads)" in fails[0]


def test_too_much_static_shared_memory_fails(tmp_path, capsys, sources):
    code, out = _run(tmp_path, capsys, _kernel("fine_kernel", smem=48 * 1024) + _kernel("wide_kernel", smem=49153),
                     sources)
    assert code == 1
    fails = [line for line in out.splitlines() if "FAIL" in line]
    assert len(fails) == 1 and "wide_kernel" in fails[0]
    assert "49153 bytes of static shared memory > the 49152 bytes (48 KiB) static limit" in fails[0]


def test_256_registers_fail(tmp_path, capsys):
    code, out = _run(tmp_path, capsys, _kernel("many_registers_kernel", registers=256), tmp_path / "none")
    assert code == 1
    assert "many_registers_kernel" in out and "256 registers per thread > 255" in out
    assert "no __launch_bounds__ found in the sources: block size unknown, only registers <= 255 checked" in out


def test_a_block_that_cannot_fit_an_sm_fails(tmp_path, capsys, sources):
    # 128 registers x 256 threads = 32768 fit; 129 registers x 512 threads (136 allocated) do not
    code, out = _run(tmp_path, capsys, _kernel("fine_kernel", registers=128) + _kernel("wide_kernel", registers=129),
                     sources)
    assert code == 1
    fails = [line for line in out.splitlines() if "FAIL" in line]
    assert len(fails) == 1 and "wide_kernel" in fails[0]
    assert "129 registers x 512 threads (69632 allocated) > the 65536 registers of an SM" in fails[0]


def test_a_log_without_ptxas_lines_fails(tmp_path, capsys):
    for text in ("", "[1/2] c++ -c csrc/ops.cpp -o build/ops.o\nSuccessfully installed llama_fast\n"):
        code, out = _run(tmp_path, capsys, text)
        assert code == 1
        assert "check_ptxas: FAIL: no ptxas lines in" in out and "nothing was checked" in out


def test_a_missing_log_fails(tmp_path, capsys):
    assert check_ptxas.main([str(tmp_path / "absent.log")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_every_architecture_is_a_row(tmp_path, capsys, sources):
    code, out = _run(tmp_path, capsys, _kernel("fine_kernel", arch="sm_80") + _kernel("fine_kernel"), sources)
    assert code == 0, out
    assert "check_ptxas: OK, 2 kernels" in out and "sm_80" in out and "sm_90" in out
