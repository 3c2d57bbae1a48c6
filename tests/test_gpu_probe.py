"""benchmarks/gpu_probe.py's kernel categories, on kernel names from a profiled step of the 1.1B model on an
H100 (benchmarks/results/full_combination_h100/): quack's RMSNorms, CuTe DSL kernels named like its GEMMs, count
with the norms; FlashAttention-4's, also CuTe DSL, with attention; the compiled bf16-master step's foreach kernels
with the optimizer."""

import pytest
from conftest import load_benchmark

gpu_probe = load_benchmark("gpu_probe")

ELEMENTWISE = "elementwise, norm, loss"
NAMES = [
    ("kernel_cutlass_kernel_quackrmsnormRMSNorm_object_at__tensorptrbf16gmemalign16o2048i64div81", ELEMENTWISE),
    ("kernel_cutlass_kernel_quackrmsnormRMSNormBackward_object_at__tensorptrbf16gmemalign16o2048", ELEMENTWISE),
    ("triton_poi_fused_add_rmsnorm_bwd_f_view_4", ELEMENTWISE),
    ("triton_red_fused__log_softmax__to_copy_prepare_softmax_online_view_0", ELEMENTWISE),
    ("kernel_cutlass_kernel_quackgemm_default_epiGemmDefaultSm90_object_at__TiledMMA_ThrLayoutVM", "gemm"),
    ("kernel_cutlass_kernel_quackepiloguefrontendGemmMod_dgated_epi_e33f6fcaf9e83884_p_c_sm9_obj", "gemm"),
    ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", "gemm"),
    ("kernel_cutlass_kernel_flash_attncuteflash_bwd_sm90FlashAttentionBackwardSm90_object_at__te", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64_4x1x1", "attention"),
    ("triton_for_fused_12", "optimizer"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous n", "optimizer"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, std::arr", "other"),
]


@pytest.mark.parametrize("name, category", NAMES)
def test_kernel_category(name, category):
    assert gpu_probe.kernel_category(name) == category


def test_categorize_sums_by_category_and_keeps_what_a_top_list_leaves_out():
    kernels = [[NAMES[0][0], 0.015], [NAMES[4][0], 0.146], [NAMES[6][0], 0.054], [NAMES[9][0], 0.003]]
    assert gpu_probe.categorize({"kernel_total_s": 0.218, "kernels": kernels}) == {
        ELEMENTWISE: 0.015, "gemm": 0.2, "optimizer": 0.003}
    assert gpu_probe.categorize({"kernel_total_s": 0.22, "top": kernels}) == {
        ELEMENTWISE: 0.015, "gemm": 0.2, "optimizer": 0.003, "unlisted": 0.002}
