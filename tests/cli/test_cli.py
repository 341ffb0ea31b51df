import json
import subprocess
import sys

import pytest

from kdarch.cli import main


def test_info_prints_preset_sizes(capsys):
    assert main(["info", "--preset", "debug"]) == 0
    info = json.loads(capsys.readouterr().out)
    from kdarch import get_preset
    cfg = get_preset("debug")
    assert info["params_total"] == cfg.num_params()
    assert info["params_active_per_token"] == cfg.num_active_params()
    assert info["kv_cache_bytes_per_token_latent_bf16"] == cfg.kv_cache_bytes_per_token(latent=True)


def test_demo_runs_end_to_end():
    out = subprocess.run([sys.executable, "-m", "kdarch", "demo", "--steps", "2", "--new-tokens", "4"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    assert "parameters:" in out and "KV cache per token" in out and "step    2" in out
    assert "sampled 4 tokens" in out and "identical to plain greedy" in out


def test_bad_preset_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["info", "--preset", "huge"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
