"""Config tree: presets, env/CLI overrides, validation errors, round trip."""

import dataclasses
import subprocess
import sys

import pytest

from golf.config import PRESETS, Config, ConfigError, load_config


def test_field_names_are_unique_so_each_has_one_env_var():
    names = [f.name for s in Config().sections().values() for f in dataclasses.fields(s)]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_validate(preset):
    cfg = load_config(preset, environ={})
    assert cfg.preset == preset


def test_record_preset_matches_techniques():
    m, t = load_config("record", environ={}).model, load_config("record", environ={}).train
    assert (m.num_layers, m.model_dim, m.vocab_size, m.num_heads, m.num_kv_heads) == (11, 512, 8192, 8, 4)
    assert (m.rope_dims, m.loop_start, m.loop_end, m.num_loops, m.parallel_from) == (16, 3, 5, 3, 7)
    assert (t.train_seq_len, t.train_batch_tokens, t.ema_decay) == (2048, 786_432, 0.9965)


def test_baseline_is_the_official_9x512():
    cfg = load_config("baseline", environ={})
    assert (cfg.model.num_layers, cfg.model.model_dim, cfg.model.mlp_mult, cfg.model.vocab_size) == (9, 512, 2.0, 1024)
    assert (cfg.train.train_seq_len, cfg.train.train_batch_tokens) == (1024, 524_288)


def test_env_overrides_use_official_names():
    env = {"NUM_LAYERS": "7", "MATRIX_LR": "0.03", "TIE_EMBEDDINGS": "0", "SEED": "42",
           "DATA_PATH": "/x", "TRAIN_BATCH_TOKENS": "262_144", "UNRELATED": "1"}
    cfg = load_config("baseline", environ=env)
    assert cfg.model.num_layers == 7 and cfg.train.matrix_lr == 0.03 and cfg.model.tie_embeddings is False
    assert cfg.train.seed == 42 and cfg.data.data_path == "/x" and cfg.train.train_batch_tokens == 262_144


def test_cli_overrides_win_over_env():
    cfg = load_config("baseline", ["num_layers=5", "model.model_dim=256"], environ={"NUM_LAYERS": "7"})
    assert (cfg.model.num_layers, cfg.model.model_dim) == (5, 256)


@pytest.mark.parametrize("env,message", [
    ({"NUM_LAYERS": "eleven"}, "NUM_LAYERS='eleven' is not a valid int"),
    ({"TIE_EMBEDDINGS": "maybe"}, "not a valid bool"),
    ({"MODEL_DIM": "500"}, "model_dim must be divisible by num_heads"),
    ({"EVAL_STRIDE": "5000"}, "eval_stride"),
    ({"MLP_BITS": "9"}, "mlp_bits must be in [2, 8]"),
    ({"COMPILE_MODE": "max-autotune"}, "compile_mode must be default|coordinate-descent"),
    ({"TTT_DEADLINE_S": "-1"}, "ttt_deadline_s must be >= 0"),
    ({"FUSED_QK_ROPE": "1", "QK_NORM": "0"}, "fused_qk_rope needs qk_norm"),
    ({"FUSED_XSA": "1"}, "fused_xsa needs xsa"),
])
def test_bad_values_are_one_line_errors(env, message):
    with pytest.raises(ConfigError) as info:
        load_config("baseline", environ=env)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_unknown_override_and_preset():
    with pytest.raises(ConfigError, match="unknown config field"):
        load_config("baseline", ["no_such_field=1"], environ={})
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("nope", environ={})


def test_json_round_trip(tmp_path):
    cfg = load_config("record", ["num_layers=10"], environ={})
    cfg.save(tmp_path / "c.json")
    again = load_config(config_file=str(tmp_path / "c.json"), environ={})
    assert again.to_dict() == cfg.to_dict()


def test_cli_bad_value_exits_2_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "golf", "config", "--preset", "baseline"],
                          env={"NUM_LAYERS": "x", "PATH": ""}, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "Traceback" not in proc.stderr
