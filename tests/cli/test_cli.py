import json
import subprocess
import sys

import pytest

from kdarch import CausalLM, get_preset
from kdarch.cli import main


def test_info_prints_preset_sizes(capsys):
    """Against counts made from an instantiated model and by hand, not from the config's own formulas."""
    assert main(["info", "--preset", "debug"]) == 0
    info = json.loads(capsys.readouterr().out)
    model = CausalLM(get_preset("debug"))
    assert info["params_total"] == sum(p.numel() for p in model.parameters())  # shared tensors counted once
    # active per token: the main model only (no MTP), with E - K routed experts of each MoE layer left out
    main_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    E, K, D, I = 8, 2, 64, 32  # the debug preset: 8 experts, top-2, width 64, expert width 32; 1 MoE layer of 2
    assert info["params_active"] == main_params - (E - K) * 3 * D * I
    # bf16 bytes per token over 2 layers: latent 32 + rope 8; full heads 4 x (qk 16+8 + v 16)
    assert info["kv_cache_bytes_per_token"] == 2 * (32 + 8) * 2
    assert info["kv_cache_bytes_per_token_full_heads"] == 2 * 4 * (24 + 16) * 2


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
