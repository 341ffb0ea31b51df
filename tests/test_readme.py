"""Every Python block of README.md runs as written, against small models made here where it names paths, so
the README cannot drift from the package."""
import re
from pathlib import Path

import pytest
import torch

import kdarch
from kdarch.train.tokenizer import ByteTokenizer

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_block_runs(i, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # what `kdarch distill --out runs/demo` leaves for its teacher: a kdarch model directory with its tokenizer
    torch.manual_seed(0)
    teacher = kdarch.CausalLM(kdarch.get_preset("debug", vocab_size=ByteTokenizer().vocab_size, max_seq_len=256))
    kdarch.save_pretrained(teacher, "runs/demo/teacher/model")
    ByteTokenizer().save("runs/demo/teacher/model")
    exec(compile(BLOCKS[i], f"README.md block {i}", "exec"), {"__name__": "readme"})
