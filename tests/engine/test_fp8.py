"""FP8 linear layers: the quantization arithmetic against fp32, the packed forward with FP8 projections against the
fp32 per-pair path, where FP8 is refused, and the published model shapes through the packed path (GPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bench.agreement import agreement, spearman, top_overlap
from bench.compare_per_pair import log_odds
from bench.workloads import make_job
from worker.engine.api import ScoreRequest
from worker.engine.engine import RerankEngine
from worker.engine.fp8 import FP8, FP8_MAX, Fp8Weight, fp8_linear, fp8_linear_reference, fp8_unsupported, quantize_rows
from worker.engine.load import load_engine
from worker.engine.qwen3 import Qwen3PackedScorer
from worker.testing.offline_model import SIZES, _qwen3_config, build_random_reranker

# e4m3 keeps 3 mantissa bits: rounding moves a value by at most 1/16 of itself (half a step of 1/8), and a value
# below the smallest normal by half a subnormal step; both stay under 1/16 of the row's largest value.
E4M3_HALF_STEP = 2.0**-4


def random_rows(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Rows of very different ranges (1e-3 to 1e3), one all zero, one with a single outlier."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.logspace(-3, 3, rows)[:, None]
    x[1] = 0.0
    x[2, 5] = 1e4
    return x


def test_quantize_rows_keeps_each_row_within_half_an_e4m3_step_of_its_range() -> None:
    x = random_rows(16, 256, seed=0)
    x8, scale = quantize_rows(x)
    assert x8.dtype == FP8
    assert x8.shape == x.shape
    assert scale.shape == (16, 1)
    assert scale.dtype == torch.float32
    back = x8.float() * scale
    assert torch.isfinite(back).all()
    assert (back[1] == 0).all()  # a zero row stays zero, not NaN
    amax = x.abs().amax(dim=1, keepdim=True)
    assert ((back - x).abs() <= E4M3_HALF_STEP * amax + 1e-30).all()
    # each row's largest value lands on the largest e4m3 value: the whole range is used
    nonzero = amax[:, 0] > 0
    assert torch.allclose(x8.float().abs().amax(dim=1)[nonzero], torch.full_like(amax[nonzero, 0], FP8_MAX))


def test_fp8_weights_have_one_scale_per_output_channel() -> None:
    w = random_rows(32, 64, seed=1).to(torch.bfloat16)
    q = Fp8Weight.quantize(w)
    assert q.data.shape == (32, 64)
    assert q.data.is_contiguous()
    assert q.scale.shape == (1, 32)
    assert q.scale.is_contiguous()
    err = (q.dequantized() - w.float()).abs().amax(dim=1)
    assert (err <= E4M3_HALF_STEP * w.float().abs().amax(dim=1) + 1e-30).all()  # row by row, tiny rows too
    assert q.nbytes == 32 * 64 + 32 * 4


def test_fp8_linear_equals_its_dequantized_fp32_reference() -> None:
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(40, 128, generator=g) * torch.logspace(-2, 2, 40)[:, None]).to(torch.bfloat16)
    weight = torch.randn(96, 128, generator=g) / 10
    w = Fp8Weight.quantize(weight.to(torch.bfloat16))
    got = fp8_linear(x, w.data, w.scale)
    assert got.dtype == torch.bfloat16
    assert got.shape == (40, 96)
    want = fp8_linear_reference(x, w)
    # per row, as the scales are: only the fp32 sum order and the final bf16 rounding differ
    rel = ((got.float() - want).norm(dim=1) / want.norm(dim=1)).max().item()
    assert rel <= 2**-8
    # and the FP8 product stays near the exact one: e4m3 rounding of both operands, a few percent
    exact = x.float() @ weight.to(torch.bfloat16).float().t()
    rel_exact = ((got.float() - exact).norm(dim=1) / exact.norm(dim=1)).max().item()
    assert rel_exact <= 0.06


def test_fp8_is_refused_on_the_cpu_before_the_weights_load(tiny_model_dir: Path) -> None:
    assert "not the CPU" in str(fp8_unsupported(torch.device("cpu"), torch.bfloat16))
    with pytest.raises(ValueError, match=r"RERANK_QUANTIZATION=fp8 cannot run here: .*not the CPU"):
        load_engine(str(tiny_model_dir), device="cpu", quantization="fp8")
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        load_engine(str(tiny_model_dir), device="cpu", quantization="int4")


def test_spearman_and_top_overlap() -> None:
    a = np.array([0.1, 0.4, 0.4, 0.9, 0.2])
    assert spearman(a, a) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    # ties share their mean rank: ranks of a are 0, 2.5, 2.5, 4, 1
    b = np.array([0.0, 3.0, 2.0, 4.0, 1.0])
    ra, rb = np.array([0, 2.5, 2.5, 4, 1]), np.array([0, 3, 2, 4, 1.0])
    want = float(np.corrcoef(ra, rb)[0, 1])
    assert spearman(a, b) == pytest.approx(want)
    assert top_overlap(a, b, k=2) == 2
    assert top_overlap(a, -a, k=2) == 0


def test_published_shapes_are_the_released_configs() -> None:
    for size, hidden, intermediate, layers, tied in (
        ("0.6b", 1024, 3072, 28, True),
        ("4b", 2560, 9728, 36, True),
        ("8b", 4096, 12288, 36, False),
    ):
        config = _qwen3_config(size)  # type: ignore[arg-type]
        assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (
            hidden,
            intermediate,
            layers,
        )
        assert (config.head_dim, config.num_key_value_heads, config.vocab_size) == (128, 8, 151669)
        assert config.num_attention_heads == (16 if size == "0.6b" else 32)
        assert config.tie_word_embeddings is tied
        assert (config.max_position_embeddings, config.rms_norm_eps) == (40960, 1e-6)
    assert _qwen3_config("full").to_dict() == _qwen3_config("0.6b").to_dict()  # the old name of the 0.6B shape
    assert _qwen3_config("4b", layers=2).num_hidden_layers == 2
    assert set(SIZES) == {"tiny", "0.6b", "4b", "8b"}


def fp8_engine(model_dir: Path, engine: RerankEngine, device: str = "cpu", *, compile: bool = False) -> RerankEngine:
    """An FP8 engine over the tiny model on any device (load_engine refuses the CPU; the scorer runs wherever
    `torch._scaled_mm` does), bf16 activations, SDPA on the CPU."""
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16, attn_implementation="sdpa")
    model.to(device).eval().requires_grad_(False)
    tok = engine.tokenizer
    scorer = Qwen3PackedScorer(
        model, yes_id=tok.yes_id, no_id=tok.no_id, attention="sdpa", compile=compile, quantization="fp8"
    )
    return RerankEngine(tok, scorer, model_name=str(model_dir), max_pack_tokens=4096)


def agreement_requests() -> list[ScoreRequest]:
    rng = np.random.default_rng(3)
    return [make_job(rng, n, 30, 120) for n in (40, 60, 33)]


def test_fp8_packed_forward_ranks_like_the_fp32_engine(tiny_model_dir: Path, engine: RerankEngine) -> None:
    """The FP8 forward's wiring (scales, the residual adds moved into the next step, the tail in bf16): on the
    CPU the tiny model's FP8 scores rank the documents as the session's engine does (fp32 on the CPU; the GPU
    suite's fp32 engine on CUDA). A lost residual add or a wrong scale would scramble the ranking; FP8 rounding
    alone moves a log-odds by a few tenths here (hidden size 64)."""
    fp8 = fp8_engine(tiny_model_dir, engine)
    assert fp8.info.quantization == "fp8"
    scorer = fp8.scorer
    assert isinstance(scorer, Qwen3PackedScorer)
    decoder_layers = scorer.model.get_decoder().layers
    assert decoder_layers[0].mlp.down_proj.weight.numel() == 0  # the bf16 projections are released ...
    assert decoder_layers[-1].mlp.down_proj.weight.numel() > 0  # ... but the tail's
    requests = agreement_requests()
    for got, want in zip(fp8.score(requests), engine.score(requests), strict=True):
        a = agreement(np.asarray(got.scores, dtype=np.float64), np.asarray(want.scores, dtype=np.float64))
        print(a)
        assert a["spearman"] >= 0.98
        assert a["max_logodds_diff_over_std"] <= 0.5
        assert a["top10_overlap"] >= 8


if torch.cuda.is_available():  # FP8 tensor cores, CUDA graphs and the published shapes' kernels exist only on CUDA

    def fp8_capable() -> bool:
        return fp8_unsupported(torch.device("cuda"), torch.bfloat16) is None

    def test_fp8_on_cuda_agrees_with_fp32_as_on_the_cpu_and_graphs_change_nothing(tiny_model_dir: Path) -> None:
        if not fp8_capable():
            with pytest.raises(ValueError, match=r"compute capability 8\.9"):
                load_engine(str(tiny_model_dir), device="cuda", quantization="fp8")
            return
        requests = agreement_requests()
        exact = load_engine(str(tiny_model_dir), device="cuda", dtype="float32").score(requests)
        fp8 = load_engine(str(tiny_model_dir), device="cuda", quantization="fp8", max_pack_tokens=4096)
        assert (fp8.info.quantization, fp8.info.attention, fp8.info.compiled) == ("fp8", "triton", True)
        before = fp8.score(requests)  # compiled, kernel by kernel
        fp8.warm_up()
        assert fp8.info.cuda_graphs > 0
        after = fp8.score(requests)
        for b, a, want in zip(before, after, exact, strict=True):
            assert float(np.abs(np.subtract(a.scores, b.scores)).max()) <= 2e-3  # graphs: the same kernels
            row = agreement(np.asarray(a.scores, dtype=np.float64), np.asarray(want.scores, dtype=np.float64))
            print(row)
            assert row["spearman"] >= 0.98
            assert row["max_logodds_diff_over_std"] <= 0.5

    @pytest.mark.parametrize("graphs", [True, False])
    def test_fp8_compiles_nothing_after_warm_up(tiny_model_dir: Path, graphs: bool) -> None:
        """A stream of random pack lengths after warm-up compiles no graph and no Triton kernel, graphs or not."""
        if not fp8_capable():
            return
        from bench.warmup import compiled_graphs, triton_compiles

        engine = load_engine(
            str(tiny_model_dir), device="cuda", quantization="fp8", max_pack_tokens=4096, cuda_graphs=graphs
        )
        engine.warm_up()
        graphs_before = compiled_graphs()
        with triton_compiles() as compiled:
            rng = np.random.default_rng(5)
            for n in rng.integers(1, 60, 12):
                engine.score([make_job(rng, int(n), 30, 120)])
        assert compiled == []
        assert compiled_graphs() == graphs_before

    @pytest.mark.parametrize("size", ["0.6b", "4b", "8b"])
    def test_each_published_shape_scores_like_the_per_pair_path(tmp_path: Path, size: str) -> None:
        """Each published shape (two layers of it) through the packed path: fp32 equals the fp32 per-pair path;
        bf16 (Triton attention, the fused gate/up kernel at this width) and FP8 stay near it."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from bench.compare_per_pair import per_pair_scores

        model_dir = build_random_reranker(tmp_path / size, size, seed=0, layers=2, device="cuda")  # type: ignore[arg-type]
        (job,) = [make_job(np.random.default_rng(9), 24, 30, 120)]
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        reference: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        truth = per_pair_scores(reference.cuda().eval(), tokenizer, job)
        reference.to(torch.bfloat16)
        bf16_pairs = per_pair_scores(reference, tokenizer, job)
        del reference
        exact = load_engine(str(model_dir), device="cuda", dtype="float32", compile="off").score([job])[0]
        assert float(np.abs(np.subtract(exact.scores, truth)).max()) <= 1e-4
        bf16_gap = float(np.abs(log_odds(bf16_pairs) - log_odds(truth)).max())
        variants = ["none", "fp8"] if fp8_capable() else ["none"]
        for quantization in variants:
            engine = load_engine(
                str(model_dir),
                device="cuda",
                dtype="bfloat16",
                quantization=quantization,
                max_pack_tokens=4096,
                compile="off",  # the Triton kernels and the FP8 matmuls at this shape; compiling is tested above
            )
            got = np.asarray(engine.score([job])[0].scores, dtype=np.float64)
            row = agreement(got, truth)
            print(size, quantization, row, f"bf16 per-pair max log-odds gap {bf16_gap:.3g}")
            if quantization == "none":
                assert row["max_logodds_diff"] <= 2 * bf16_gap + 1e-3
            else:
                assert row["spearman"] >= 0.98
            del engine
            torch.cuda.empty_cache()
