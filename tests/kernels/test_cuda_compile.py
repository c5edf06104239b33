"""Every CUDA source of hpc_llm/kernels/cuda compiles for sm_80 and sm_90 with NVRTC (no GPU needed); a source with an
error fails with the compiler's log. CI installs cupy-cuda12x and nvidia-cuda-nvrtc-cu12 for this (the test extras)."""

import shutil

import pytest

from hpc_llm.kernels.cuda import device

KERNELS = {
    "attention": [
        "attention_forward",
        "attention_backward_dot",
        "attention_backward_kv",
        "attention_backward_q",
    ],
    "adamw": ["adamw_f32", "adamw_f64", "sumsq_f32", "sumsq_f64", "sumsq_finish"],
    "bias_gelu": ["bias_gelu_forward", "bias_gelu_backward"],
    "dropout_residual": ["dropout_residual_forward", "dropout_residual_backward", "dropout_scale"],
    "round": ["round_format", "narrow_format", "widen_format", "narrow_round"],
    "layernorm": ["layernorm_forward", "layernorm_backward", "layernorm_weight"],
    "softmax": ["masked_softmax_forward", "masked_softmax_backward"],
}

# the tile products of the 16-bit formats (mma.cuh), not compiled away
TENSOR_CORES = {
    "attention": [f"mma.sync.aligned.m16n8k16.row.col.f32.{t}.{t}.f32" for t in ("bf16", "f16")]
}


def test_every_source_is_listed():
    assert device.SOURCES == sorted(KERNELS)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
@pytest.mark.parametrize("name", sorted(KERNELS))
def test_source_compiles(name, arch):
    ptx = device.compile_ptx(name, arch)
    assert f".target sm_{arch[-2:]}" in ptx
    for kernel in KERNELS[name]:
        assert f".entry {kernel}(" in ptx, kernel
    for instruction in TENSOR_CORES.get(name, ()):
        assert instruction in ptx, instruction


@pytest.mark.timeout(60)
def test_a_typo_fails_with_the_compilers_log(tmp_path, monkeypatch):
    for p in device.HERE.glob("*.cuh"):
        shutil.copy(p, tmp_path)
    src = (device.HERE / "dropout_residual.cu").read_text().replace("float b =", "flaot b =")
    (tmp_path / "dropout_residual.cu").write_text(src)
    monkeypatch.setattr(device, "HERE", tmp_path)
    with pytest.raises(RuntimeError, match=r"dropout_residual.cu \(compute_80\).*flaot"):
        device.compile_ptx("dropout_residual", "compute_80")
