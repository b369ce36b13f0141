"""bench/: the CPU smoke path of run.py and e2e.py for RMSNorm, the fused residual add +
RMSNorm, LayerNorm2d and FrozenBatchNorm2d. The same code runs on a GPU; here it
runs on the CPU at small shapes with short timings, and the checks are what the harness itself
computes: correctness against float64, the minimum bytes, the providers' modules."""
import math
import os
import sys
from dataclasses import replace

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import cases  # noqa: E402
import run  # noqa: E402

import fastnorm  # noqa: E402

NEW_OPS = ("rms_norm", "add_rms_norm", "layer_norm2d", "frozen_batch_norm", "local_response_norm")


def small(case):
    """The case at a shape a CPU test runs in milliseconds (channels and width kept)."""
    return replace(case, shape=cases.fit(case.shape, 1 << 14, case.op))



def _bench_rows(c, op):
    """bench_case's rows of case c on the CPU, fastnorm and eager, two repetitions: all correct,
    their GB/s the op's minimum bytes over the median time."""
    timer = run.Timer(torch.device("cpu"), quick=True)
    timer.target_ms, timer.min_reps, timer.max_reps = 1, 2, 2
    meta = {k: "" for k in run.COLUMNS[:8]}
    rows = run.bench_case(c, ["fastnorm", "eager"], timer, meta, 10.0, seed=0)
    assert len(rows) == 6, [(r["provider"], r["pass"]) for r in rows]
    for r in rows:
        assert r["correct"], r
        assert r["maxdiff_y"] < 1e-4 and r["maxdiff_dx"] < 1e-4
        want = run.min_bytes(math.prod(c.shape), 4, r["pass"], op)
        assert r["gbps"] == pytest.approx(want / (r["median_ms"] * 1e-3) / 1e9)
    return rows


def test_every_new_op_has_gpu_and_quick_cases():
    gpu = cases.select("cuda", False, NEW_OPS)
    assert {c.op for c in gpu} == set(NEW_OPS)
    assert {c.op for c in cases.select("cuda", True, NEW_OPS)} == set(NEW_OPS)
    assert {c.op for c in cases.select("cpu", True, NEW_OPS)} == set(NEW_OPS)
    by = {(c.op, c.name, c.layout, c.dtype): c.shape for c in gpu}
    # the models' shapes: Llama 4096 tokens x 4096 / 8192 bf16; ConvNeXt-T stages at N = 32 in
    # both layouts; ResNet-50's BatchNorm shapes
    for op in ("rms_norm", "add_rms_norm"):
        assert by[(op, "llama-7b-4096", "contiguous", "bf16")] == (4096, 4096)
        assert by[(op, "llama-70b-8192", "contiguous", "bf16")] == (4096, 8192)
    for i, (c, hw) in enumerate(((96, 56), (192, 28), (384, 14), (768, 7))):
        for layout in ("contiguous", "channels_last"):
            assert by[("layer_norm2d", f"convnext-t-stage{i + 1}", layout, "bf16")] == (32, c, hw, hw)
    assert by[("frozen_batch_norm", "resnet50-layer1", "contiguous", "fp32")] == (64, 256, 56, 56)
    # AlexNet's and GoogLeNet's LRN (size 5) at batch 128, both layouts
    for layout in ("contiguous", "channels_last"):
        assert by[("local_response_norm", "alexnet-lrn1", layout, "fp32")] == (128, 96, 55, 55)
        assert by[("local_response_norm", "googlenet-lrn2", layout, "fp32")] == (128, 192, 56, 56)


def test_min_bytes_per_op():
    n, b = 1000, 2
    assert [run.min_bytes(n, b, p) for p in run.PASSES] == [2 * n * b, 3 * n * b, 5 * n * b]
    # add_rms_norm: fwd reads input and residual, writes output and residual_out; bwd reads dy,
    # d residual_out and residual_out, writes one input gradient
    assert [run.min_bytes(n, b, p, "add_rms_norm") for p in run.PASSES] == [4 * n * b, 4 * n * b,
                                                                             8 * n * b]
    # FrozenBatchNorm2d: dx = dy * scale reads dy only
    assert [run.min_bytes(n, b, p, "frozen_batch_norm") for p in run.PASSES] == [2 * n * b,
                                                                                  2 * n * b,
                                                                                  4 * n * b]
    for op in ("rms_norm", "layer_norm2d"):
        assert [run.min_bytes(n, b, p, op) for p in run.PASSES] == [2 * n * b, 3 * n * b, 5 * n * b]


def test_reference_layers_and_fastnorm_modules():
    # the baselines are the layers a model would otherwise run, fastnorm's the drop-in or fused one
    want = {"rms_norm": (torch.nn.RMSNorm, fastnorm.RMSNorm),
            "add_rms_norm": (cases.AddRMSNorm, cases.FusedAddRMSNorm)}
    for c in cases.select("cpu", True, NEW_OPS):
        ref = c.module()
        fast = c.fastnorm_module(ref)
        assert fast is not ref
        if c.op in want:
            assert type(ref) is want[c.op][0] and type(fast) is want[c.op][1]
        elif c.op == "local_response_norm":
            assert type(ref) is torch.nn.LocalResponseNorm and c.drop_in
            assert type(fast) is fastnorm.LocalResponseNorm and ref.size == fast.size == 5
        elif c.op == "layer_norm2d":
            timm = pytest.importorskip("timm")
            assert type(ref) is timm.layers.LayerNorm2d and c.drop_in
            assert fastnorm.converted_modules(fast)
        else:
            tv = pytest.importorskip("torchvision")
            assert type(ref) is tv.ops.FrozenBatchNorm2d and c.drop_in
            assert fastnorm.converted_modules(fast)
            assert float(ref.running_var.min()) >= 0.5  # random statistics, not the identity
        # the same parameters and state
        for k, v in ref.state_dict().items():
            assert torch.equal(v, fast.state_dict()[k]), k


def test_fallback_baselines_without_timm_or_torchvision():
    # the stand-ins compute what timm's and torchvision's layers compute, and fastnorm's module
    # for the LayerNorm2d stand-in is built from its state (convert() does not know the class)
    torch.manual_seed(0)
    ln = cases.PermuteLayerNorm2d(12)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.normal_()
    x = torch.randn(2, 12, 5, 3)
    ref = torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (12,), ln.weight, ln.bias,
                                         ln.eps).permute(0, 3, 1, 2)
    torch.testing.assert_close(ln(x), ref)
    case = cases.Case("layer_norm2d", "t", (2, 12, 5, 3), ("fp32",))
    fast = case.fastnorm_module(ln)
    assert isinstance(fast, fastnorm.LayerNorm2d)
    torch.testing.assert_close(fast(x), ref, rtol=1e-5, atol=1e-5)
    fb = cases.FormulaFrozenBatchNorm2d(12)
    fb.running_mean.normal_()
    fb.running_var.uniform_(0.5, 2.0)
    fb.weight.uniform_(0.5, 1.5)
    fb.bias.normal_()
    want = torch.nn.functional.batch_norm(x, fb.running_mean, fb.running_var, fb.weight, fb.bias,
                                          False, 0.0, fb.eps)
    torch.testing.assert_close(fb(x), want, rtol=1e-5, atol=1e-5)
    case = cases.Case("frozen_batch_norm", "t", (2, 12, 5, 3), ("fp32",))
    fast = case.fastnorm_module(fb)
    assert isinstance(fast, fastnorm.FrozenBatchNorm2d)
    torch.testing.assert_close(fast(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", NEW_OPS)
def test_bench_case_runs_on_cpu(op):
    # run.py's own path: reference in float64, each provider checked, the three passes timed,
    # rows with the op's minimum bytes (eager and fastnorm; compile is the same code path and
    # takes inductor's C++ build here)
    layouts = (("contiguous", "channels_last")
               if op in ("layer_norm2d", "frozen_batch_norm", "local_response_norm") else ("contiguous",))
    for layout in layouts:
        (c,) = [small(c) for c in cases.select("cpu", False, [op]) if c.layout == layout][:1]
        for r in _bench_rows(c, op):
            assert r["shape"] == "x".join(map(str, c.shape)) and r["layout"] == layout


def test_hf_convention_cases():
    """Hugging Face's RMSNorm conventions: the models' shapes, transformers' own modules as the
    baselines (stand-ins spelled the same without it), and run.py's path on CPU."""
    by = {(c.op, c.name): c.shape for c in cases.select("cuda", False, cases.HF_OPS)}
    assert by[("llama_rms_norm", "llama3-8b-4096")] == (32768, 4096)
    assert by[("llama_rms_norm", "qwen3-qknorm-32x128")] == (4096, 32, 128)
    assert by[("gemma_rms_norm", "gemma-7b-3072")] == (32768, 3072)
    assert by[("gated_rms_norm", "mamba2-codestral-8192")] == (16384, 8192)
    assert {c.op for c in cases.select("cuda", True, cases.HF_OPS)} == set(cases.HF_OPS)
    torch.manual_seed(0)
    for op in cases.HF_OPS:
        dim = 2048 if op == "gated_rms_norm" else 64
        for ref in (cases.hf_rms_norm_reference(op, dim),
                    {"llama_rms_norm": cases.LlamaStyleRMSNorm, "gemma_rms_norm": cases.GemmaStyleRMSNorm,
                     "gated_rms_norm": lambda d: cases.MambaStyleGatedRMSNorm(d, cases.MAMBA_GROUP_SIZE)}[op](dim)):
            with torch.no_grad():
                ref.weight.uniform_(0.5, 1.5)
            ref = ref.to(torch.bfloat16)
            fast = cases.Case(op, "t", (3, dim), ("bf16",)).fastnorm_module(ref)
            x, gate = torch.randn(3, dim, dtype=torch.bfloat16), torch.randn(3, dim, dtype=torch.bfloat16)
            args = (x, gate) if op == "gated_rms_norm" else (x,)
            assert torch.equal(fast(*args), ref(*args)), (op, type(ref).__name__)
        (c,) = [small(c) for c in cases.select("cpu", False, [op])][:1]
        timer = run.Timer(torch.device("cpu"), quick=True)
        timer.target_ms, timer.min_reps, timer.max_reps = 1, 2, 2
        meta = {k: "" for k in run.COLUMNS[:8]}
        rows = run.bench_case(c, ["fastnorm", "eager"], timer, meta, 10.0, seed=0)
        assert len(rows) == 6 and all(r["correct"] for r in rows), rows


def test_add_rms_norm_check_sees_both_outputs():
    # check() compares every output and every input gradient: a provider that gets residual_out
    # wrong fails even with a right normalised output
    c = small(cases.select("cpu", True, ["add_rms_norm"])[0])
    ref = c.module()
    inputs, grads = run.make_inputs(c, torch.device("cpu"), 0)
    assert len(inputs) == len(grads) == 2 and all(t.requires_grad for t in inputs)
    ref_out = run.reference(ref, inputs, grads)
    assert len(ref_out[0]) == 2 and len(ref_out[1]) == 2
    assert run.check(c, c.fastnorm_module(ref), ref_out, inputs, grads)[2]

    class WrongResidual(cases.AddRMSNorm):
        def forward(self, input, residual):
            y, r = super().forward(input, residual)
            return y, r * 1.1

    bad = WrongResidual(c.channels, ref.eps)
    bad.load_state_dict(ref.state_dict())
    diff_y, _, ok = run.check(c, bad, ref_out, inputs, grads)
    assert not ok and diff_y > 0.01


def test_e2e_llama_fuses_the_adds_and_matches():
    import e2e

    r = e2e.run_model("llama", torch.device("cpu"), small=True, quick=True, steps=2, warmup=0,
                      zoo=False, seed=0)
    # 2 blocks: the first block's nn.RMSNorm, 3 fused adds in the blocks, the final fused add
    assert r["norm_layers"] == 5
    assert r["max_loss_absdiff"] < 1e-4
    model = e2e.Llama(128, 64, 2, 4, 172)
    assert cases.fuse_add_norms(model) == 4
    assert all(type(m) is not cases.AddRMSNorm for m in model.modules())


def test_e2e_convnext_runs():
    pytest.importorskip("timm")
    import e2e

    r = e2e.run_model("convnext", torch.device("cpu"), small=True, quick=True, steps=1, warmup=0,
                      zoo=False, seed=0)
    assert r["source"] == "timm" and r["norm_layers"] >= 5  # LayerNorm2d: stem, 3 downsamples, head
    assert r["max_loss_absdiff"] < 1e-4


# ----------------------------------------------------------------------------------------------
# SwitchNorm2d, AdaIN, IBN (the per-(n, c) ops) against their unfused reference compositions
# ----------------------------------------------------------------------------------------------
NC_OPS = ("switch_norm", "adain", "ibn")


def test_nc_cases_have_the_model_shapes():
    gpu = cases.select("cuda", False, NC_OPS)
    assert {c.op for c in gpu} == set(NC_OPS)
    assert {c.op for c in cases.select("cuda", True, NC_OPS)} == set(NC_OPS)
    assert {c.op for c in cases.select("cpu", True, NC_OPS)} == set(NC_OPS)
    by = {(c.op, c.name, c.layout, c.dtype): c.shape for c in gpu}
    for name, shape in (("resnet50-stem", (64, 64, 112, 112)), ("resnet50-layer1", (64, 256, 56, 56)),
                        ("resnet50-layer2", (64, 512, 28, 28)), ("resnet50-layer4", (64, 2048, 7, 7))):
        assert by[("switch_norm", name, "contiguous", "fp32")] == shape
        assert by[("switch_norm", name, "channels_last", "bf16")] == shape
    assert by[("adain", "vgg-relu4_1", "contiguous", "fp32")] == (8, 512, 64, 64)
    assert by[("adain", "vgg-relu4_1", "channels_last", "bf16")] == (8, 512, 64, 64)
    assert by[("ibn", "resnet50-ibn-a-layer1", "contiguous", "fp32")] == (64, 64, 56, 56)
    assert by[("ibn", "resnet50-ibn-a-layer3", "channels_last", "bf16")] == (64, 256, 14, 14)


def test_nc_min_bytes():
    n, b = 1000, 2
    assert [run.min_bytes(n, b, p, "adain") for p in run.PASSES] == [3 * n * b, 5 * n * b, 8 * n * b]
    for op in ("switch_norm", "ibn"):
        assert [run.min_bytes(n, b, p, op) for p in run.PASSES] == [2 * n * b, 3 * n * b, 5 * n * b]


def test_nc_references_and_fastnorm_modules():
    want = {"switch_norm": (cases.ReferenceSwitchNorm2d, fastnorm.SwitchNorm2d),
            "adain": (cases.ReferenceAdaIN, fastnorm.AdaptiveInstanceNorm),
            "ibn": (cases.ReferenceIBN, fastnorm.IBN)}
    for c in cases.select("cpu", True, NC_OPS):
        ref = c.module()
        fast = c.fastnorm_module(ref)
        assert type(ref) is want[c.op][0] and type(fast) is want[c.op][1] and not c.drop_in
        assert {k: v.shape for k, v in ref.state_dict().items()} == {
            k: v.shape for k, v in fast.state_dict().items()}
        for k, v in ref.state_dict().items():
            assert torch.equal(v, fast.state_dict()[k]), k
        if c.op == "switch_norm":
            assert float(ref.mean_weight.std()) > 0  # random mixing weights, not uniform


@pytest.mark.parametrize("op", NC_OPS)
def test_nc_bench_case_runs_on_cpu(op):
    for layout in ("contiguous", "channels_last"):
        (c,) = [small(c) for c in cases.select("cpu", False, [op]) if c.layout == layout][:1]
        for r in _bench_rows(c, op):
            assert r["layout"] == layout


def test_act_memory_fused_layer_saves_the_input_only():
    # timm's BatchNormAct2d keeps the norm's input and the activation's input for the backward;
    # the converted layer keeps the norm's input (and per-channel statistics): half, on the meta
    # device at a full benchmark shape
    pytest.importorskip("timm")
    import act_memory

    rows = act_memory.survey("meta")
    assert rows and all(r["fastnorm_bytes"] < r["timm_bytes"] for r in rows)
    for r in rows:
        assert r["saved_bytes"] >= r["x_bytes"] * 0.99, r


# ----------------------------------------------------------------------------------------------
# modulated norms of diffusion transformers (AdaLN, AdaLN-Zero's gated residual); the DiT block
# ----------------------------------------------------------------------------------------------
def test_modulated_cases_have_the_model_shapes():
    gpu = cases.select("cuda", False, cases.MOD_OPS)
    by = {(c.op, c.name): c.shape for c in gpu}
    for op in cases.MOD_OPS:
        assert by[(op, "flux-4608")] == (1, 4608, 3072)
        assert by[(op, "sd3-4429")] == (2, 4429, 1536)
        assert by[(op, "pixart-4096")] == (2, 4096, 1152)
        assert by[(op, "wan-14b-32760")] == (1, 32760, 5120)
    assert all(c.dtype == "bf16" for c in gpu)
    assert {c.op for c in cases.select("cuda", True, cases.MOD_OPS)} == set(cases.MOD_OPS)
    # on a CPU the tokens are scaled down, never the hidden size
    for c in cases.select("cpu", False, cases.MOD_OPS):
        assert c.shape[-1] in (3072, 1536, 1152, 5120) and c.shape[1] < 4096
    n, b = 1000, 2
    assert [run.min_bytes(n, b, p, "modulated_layer_norm") for p in run.PASSES] == [
        2 * n * b, 3 * n * b, 5 * n * b]
    # fwd: residual and branch read, out and residual_out written; bwd: dy, d(residual_out),
    # residual_out and branch read, d_residual and d_branch written
    assert [run.min_bytes(n, b, p, "gated_residual_modulated_norm") for p in run.PASSES] == [
        4 * n * b, 6 * n * b, 10 * n * b]


def test_modulated_references_are_diffusers_spelling():
    torch.manual_seed(0)
    x, res = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    gate, scale, shift = (torch.randn(2, 16) for _ in range(3))
    ln = torch.nn.functional.layer_norm
    ref = cases.AdaLNModulate(16)
    assert torch.equal(ref(x, scale, shift),
                       ln(x, (16,), None, None, 1e-6) * (1 + scale[:, None]) + shift[:, None])
    out, r = cases.GatedResidualAdaLN(16)(res, x, gate, scale, shift)
    r_want = res + gate[:, None] * x
    assert torch.equal(r, r_want)
    assert torch.equal(out, ln(r_want, (16,), None, None, 1e-6) * (1 + scale[:, None]) + shift[:, None])
    for op, fused in (("modulated_layer_norm", cases.FusedAdaLNModulate),
                      ("gated_residual_modulated_norm", cases.FusedGatedResidualAdaLN)):
        c = cases.Case(op, "t", (2, 5, 16), ("fp32",))
        ref = c.module()
        fast = c.fastnorm_module(ref)
        assert type(fast) is fused and not c.drop_in and c.channels == 16
        args = (x, scale, shift) if c.n_mods == 2 else (res, x, gate, scale, shift)
        for a, e in zip(run._outputs(fast(*args)), run._outputs(ref(*args))):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", ["modulated_layer_norm", "gated_residual_modulated_norm"])
def test_modulated_bench_case_runs_on_cpu(op):
    (c,) = [small(c) for c in cases.select("cpu", False, [op])][:1]
    assert c.shape[0] == 1 and c.shape[-1] == 3072  # Flux's hidden size kept
    inputs, grads = run.make_inputs(c, torch.device("cpu"), 0)
    assert len(inputs) == c.n_inputs + c.n_mods and len(grads) == c.n_outputs
    assert all(t.shape == (c.shape[0], c.shape[-1]) for t in inputs[c.n_inputs:])
    _bench_rows(c, op)


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast_path", "op_path"])
def test_dit_block_fused_matches_eager(fast_path, monkeypatch):
    import dit_block

    assert dit_block.check(fast_path=fast_path) <= 2e-5

    # the check sees a wrong fusion: the attention's and the MLP's gates swapped
    def swapped(block, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
            block.adaLN_modulation(c).chunk(6, dim=1)
        h = fastnorm.functional.modulated_layer_norm(x, scale_msa[:, None], shift_msa[:, None])
        h, x = fastnorm.functional.gated_residual_modulated_norm(
            x, block.attn(h), gate_mlp[:, None], scale_mlp[:, None], shift_mlp[:, None])
        return x + gate_msa[:, None] * block.mlp(h)

    monkeypatch.setattr(dit_block.FusedDiTBlock, "forward", swapped)
    with pytest.raises(AssertionError, match="fused vs eager"):
        dit_block.check(fast_path=fast_path)


# ----------------------------------------------------------------------------------------------
# masked norms (fastnorm.MaskedBatchNorm1d / MaskedGroupNorm against the Python composition)
# ----------------------------------------------------------------------------------------------
def test_masked_cases_have_the_shapes_and_validity():
    gpu = cases.select("cuda", False, cases.MASKED_OPS + ("batch_norm", "group_norm"))
    by = {(c.op, c.name): c for c in gpu}
    # each masked case has a plain twin of the same name and shape: the unmasked layer's time
    for op in ("masked_batch_norm", "batch_norm"):
        for ch in (256, 512):
            c = by[(op, f"conformer-{ch}-16x1500")]
            assert (c.shape, c.dtype, c.layout) == ((16, ch, 1500), "bf16", "contiguous")
    for op in ("masked_group_norm", "group_norm"):
        c = by[(op, "padded-images-128x160")]
        assert (c.shape, c.dtype, c.layout) == ((8, 256, 128, 160), "bf16", "contiguous")
    assert {c.op for c in cases.select("cuda", True, cases.MASKED_OPS)} == set(cases.MASKED_OPS)
    assert not any(c.drop_in for c in gpu if c.op in cases.MASKED_OPS)
    lens = cases.masked_lengths((16, 256, 1500))
    assert lens.dtype == torch.int64 and lens.shape == (16,)
    assert int(lens.max()) == 1500 and int(lens.min()) == 600 and len(set(lens.tolist())) == 16
    mask = cases.masked_image_mask((8, 256, 128, 160))
    assert mask.shape == (8, 128, 160) and mask.dtype == torch.bool
    assert bool(mask[:, :100, :150].all()) and int(mask.sum()) == 8 * 100 * 150
    # scaled down with the shape (the CPU suite)
    assert cases.masked_lengths((2, 8, 10)).tolist() == [10, 4]
    assert int(cases.masked_image_mask((1, 8, 4, 5)).sum()) == 3 * 5


def test_masked_references_and_fastnorm_modules():
    want = {"masked_batch_norm": (cases.MaskedBatchNormComposition, fastnorm.MaskedBatchNorm1d),
            "masked_group_norm": (cases.MaskedGroupNormComposition, fastnorm.MaskedGroupNorm)}
    for c in cases.select("cuda", True, cases.MASKED_OPS):
        c = replace(c, shape=cases.fit(c.shape, 1 << 16, c.op))
        ref = c.module()
        fast = c.fastnorm_module(ref)
        assert type(ref) is want[c.op][0] and isinstance(fast, want[c.op][1]) and fast.training
        # BatchNorm keeps float32 parameters (AMP); GroupNorm takes the input's dtype
        pdtype = torch.float32 if c.op == "masked_batch_norm" else torch.bfloat16
        assert ref.weight.dtype == fast.weight.dtype == pdtype
        assert list(ref.state_dict()) == list(fast.state_dict())
        for k, v in ref.state_dict().items():
            assert torch.equal(v, fast.state_dict()[k]), k
        if c.op == "masked_batch_norm":
            assert torch.equal(ref.lengths, cases.masked_lengths(c.shape))
            assert torch.equal(fast.lengths, ref.lengths)
        else:
            assert ref.num_groups == fast.num_groups == 32
            assert torch.equal(fast.valid_mask, cases.masked_image_mask(c.shape))


@pytest.mark.parametrize("op", ["masked_batch_norm", "masked_group_norm"])
def test_masked_composition_is_fastnorms_computation(op):
    """The baseline computes what fastnorm's masked layer computes: float64, two training steps
    (running statistics) and an eval step, outputs and every gradient; the padding holds large
    finite garbage (the composition multiplies by the mask, as models write it: NaN * 0 would
    leak, fastnorm's layer would not)."""
    torch.manual_seed(0)
    shape = (3, 64, 20) if op == "masked_batch_norm" else (2, 64, 6, 8)
    c = cases.Case(op, "t", shape, ("fp32",))
    ref = c.module().double()
    fast = c.fastnorm_module(ref)
    valid = (torch.arange(20) < ref.lengths[:, None]).unsqueeze(1) if op == "masked_batch_norm" \
        else ref.valid_mask.unsqueeze(1)
    assert not bool(valid.all())  # some padding
    for step in range(3):
        for m in (ref, fast):
            m.train(step < 2)
        x = torch.randn(shape, dtype=torch.float64) * 2 + step
        x = torch.where(valid, x, torch.full_like(x, 1e4))
        g = torch.randn(shape, dtype=torch.float64)
        outs = []
        for m in (ref, fast):
            xa = x.clone().requires_grad_()
            y = m(xa)
            grads = torch.autograd.grad(y, (xa, m.weight, m.bias), g)
            outs.append((y, *grads))
        for a, e, what in zip(outs[1], outs[0], ("y", "dx", "dweight", "dbias")):
            torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9, msg=f"step {step} {what}")
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(fast.state_dict()[k], v, rtol=1e-12, atol=1e-12,
                                       msg=f"step {step} {k}")


@pytest.mark.parametrize("op", ["masked_batch_norm", "masked_group_norm"])
def test_masked_bench_case_runs_on_cpu(op):
    (c,) = [small(c) for c in cases.select("cpu", False, [op])][:1]
    _bench_rows(c, op)
    # the check sees the validity: fastnorm's layer with other lengths / another mask fails it
    ref = c.module()
    inputs, grads = run.make_inputs(c, torch.device("cpu"), 0)
    ref_out = run.reference(ref, inputs, grads)
    fast = c.fastnorm_module(ref)
    assert run.check(c, fast, ref_out, inputs, grads)[2]
    with torch.no_grad():
        if op == "masked_batch_norm":
            fast.lengths.sub_(1)
        else:
            fast.valid_mask[:, -1, :] = ~fast.valid_mask[:, -1, :]
    assert not run.check(c, fast, ref_out, inputs, grads)[2]
