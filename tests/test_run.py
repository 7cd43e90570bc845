"""golf.run: which evaluations a run scores, and which one is its result."""

from __future__ import annotations

from golf.config import load_config
from golf.run import eval_stages


def test_eval_stages_end_with_the_score_and_skip_sliding_only_when_asked():
    assert eval_stages(load_config("record", ["ttt_mode=none"])) == ["prequant", "quant", "sliding"]
    sgd = load_config("record", ["ttt_mode=sgd", "sliding_with_ttt=1"])
    assert eval_stages(sgd) == ["prequant", "quant", "sliding", "ttt"]
    record = load_config("record")  # LoRA TTT: its eval budget has no room for the sliding diagnostic
    assert record.ttt.ttt_mode == "lora" and eval_stages(record) == ["prequant", "quant", "ttt"]
    assert eval_stages(load_config("record", ["ttt_mode=none", "eval_stride=0", "sliding_with_ttt=0"])) == [
        "prequant", "quant"]
