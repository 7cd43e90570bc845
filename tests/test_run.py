"""golf.run: which evaluations a run scores, and which one is its result."""

from __future__ import annotations

from golf.config import load_config
from golf.run import eval_stages


def test_eval_stages_end_with_the_score_and_skip_sliding_only_when_asked():
    assert eval_stages(load_config("record", ["ttt_mode=none"])) == ["prequant", "quant", "sliding"]
    assert eval_stages(load_config("record", ["ttt_mode=sgd"])) == ["prequant", "quant", "sliding", "ttt"]
    lora = load_config("record", ["ttt_mode=lora", "lora_phases=3", "sliding_with_ttt=0"])
    assert eval_stages(lora) == ["prequant", "quant", "ttt"]  # the LoRA eval budget has no room for it
    assert eval_stages(load_config("record", ["ttt_mode=none", "eval_stride=0", "sliding_with_ttt=0"])) == [
        "prequant", "quant"]
