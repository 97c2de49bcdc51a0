"""The mid (~57M parameter) phi3 model through demo-model -> merge -> export -> verify, fp32 and fp16."""

from __future__ import annotations

import pytest

from loraship.export.demo_model import demo_model
from loraship.export.merge import merge
from loraship.export.onnx_export import export_onnx
from loraship.export.verify import verify


@pytest.mark.slow
def test_mid_phi3_fp32_and_fp16(tmp_path):
    demo = demo_model(tmp_path / "demo", arch="phi3", size="mid", random=True)
    merged = merge(demo / "base", demo / "adapter", tmp_path / "merged")
    fp32 = verify(merged, export_onnx(merged, tmp_path / "onnx32", dtype="fp32"))
    assert fp32.passed and fp32.tokens_identical and fp32.max_abs_logit_diff < 1e-4
    fp16 = verify(merged, export_onnx(merged, tmp_path / "onnx16", dtype="fp16"))
    assert fp16.passed and fp16.max_abs_logit_diff < 5e-2 and fp16.token_agreement >= 0.9
