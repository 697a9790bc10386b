import re
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"


def _block(after: str) -> str:
    text = README.read_text()
    return re.search(r"```python\n(.*?)```", text[text.index(after):], re.S).group(1)


def test_python_api_example_runs(hub_env, server, capsys):
    code = _block("## Python API").replace('"gpt2-small"', '"gpt2-tiny"')
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert out.startswith("Every effort moves you") and len(out) > 40


def test_readme_documents_every_environment_variable():
    text = README.read_text()
    sources = "".join(p.read_text() for p in (README.parent / "gpt2hub").glob("*.py"))
    for var in sorted(set(re.findall(r"GPT2HUB_[A-Z_]+", sources))):
        assert f"`{var}" in text, var


def test_export_example_runs(hub_env, server, tmp_path, monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)
    code = _block("## Export and serving").replace('"gpt2-small"', '"gpt2-tiny"')
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    hf, model = scope["hf"], scope["model"]
    assert sorted(p.name for p in (tmp_path / "gpt2-small-hf").iterdir()) == [
        "config.json", "merges.txt", "model.safetensors", "tokenizer_config.json", "vocab.json"]
    assert torch.equal(hf.transformer.wte.weight.to(torch.bfloat16), model.tok_emb.weight.to(torch.bfloat16))
