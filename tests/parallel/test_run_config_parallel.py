"""The [parallel] section of a run config: parsed from TOML and flags like the other sections, refused with a
message naming the field, written back by to_toml; the train loop's own refusals under a plan."""
import pytest

from kdarch.checks import ConfigError
from kdarch.parallel.config import ParallelConfig
from kdarch.train.config import load_run_config


def _load(tmp_path, text, overrides=None):
    f = tmp_path / "run.toml"
    f.write_text(text)
    return load_run_config(f, overrides)


def test_parallel_section_from_toml_and_flags(tmp_path):
    run = _load(tmp_path, "[parallel]\ndp_shard = 2\nep = 2\ntimeout_s = 30\n")
    assert run.parallel == ParallelConfig(dp_shard=2, ep=2, timeout_s=30.0)
    assert load_run_config(None).parallel == ParallelConfig()
    assert load_run_config(None, {"parallel.dp_shard": 4, "parallel.ep": 2}).parallel.mesh_shape == (1, 1, 2, 2, 1)
    again = _load(tmp_path, run.to_toml())
    assert again.parallel == run.parallel


@pytest.mark.parametrize("text,msg", [
    ("[parallel]\ndp_shrad = 2\n", "parallel: unknown field(s) ['dp_shrad']"),
    ("[parallel]\ndp_shard = 2\nep = 3\n", "parallel.ep: expected a divisor of dp_shard=2, got 3"),
    ("[parallel]\ndp_shard = 'two'\n", "parallel.dp_shard: expected an int, got 'two'"),
    ("[parallel]\ntimeout_s = 0\n", "parallel.timeout_s: expected a number > 0, got 0"),
])
def test_parallel_section_refusals(tmp_path, text, msg):
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, text)
    assert str(e.value).startswith(msg), str(e.value)


def test_parallel_flags_are_documented():
    from kdarch.cli import build_parser
    text = build_parser().commands["train"].format_help()
    assert "--parallel.dp_shard" in text and "--parallel.ep" in text and "--parallel.timeout_s" in text
    assert "FSDP2 fully_shard" in text


def test_train_loop_refusals_name_the_field():
    from kdarch.parallel import runtime
    with pytest.raises(ConfigError, match=r"^parallel.tp: expected 1 in the train loop"):
        runtime.init_distributed(ParallelConfig(tp=2))
    assert runtime.current() is None
