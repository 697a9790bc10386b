"""gpt2hub as a type checker sees it once installed the README's way (`pip install -e .`): found from any folder."""

import os
import re
import subprocess
import sys
from pathlib import Path

PROBE = """\
import gpt2hub

reveal_type(gpt2hub.from_pretrained("gpt2-small"))
reveal_type(gpt2hub.load_tokenizer("gpt2-small").encode("hi"))
"""


def test_mypy_finds_the_installed_package_from_another_folder(tmp_path):
    """mypy run outside the repository resolves `import gpt2hub` through the installed package (py.typed, and for an
    editable install a plain path entry, which mypy can follow where it cannot follow setuptools' import hook)."""
    (tmp_path / "probe.py").write_text(PROBE)
    (tmp_path / "mypy.ini").write_text("[mypy]\n")  # the user's own mypy settings play no part
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MYPYPATH")}  # the install alone
    result = subprocess.run([sys.executable, "-m", "mypy", "--config-file", "mypy.ini", "--cache-dir", "cache",
                             "--no-color-output", "probe.py"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    out = result.stdout + result.stderr
    assert "Cannot find implementation or library stub" not in out, (
        f"mypy cannot see gpt2hub installed in {sys.prefix}: install it as the README says (`pip install -e .`); an "
        f"editable install made before pyproject.toml set package-dir uses an import hook, so reinstall.\n{out}")
    assert 'Revealed type is "gpt2hub.model.GPTModel"' in out, out
    assert re.search(r'Revealed type is "(builtins\.)?list\[(builtins\.)?int\]"', out), out  # mypy 2 drops "builtins."
    assert result.returncode == 0, out


TEXT_PROBE = """\
import gpt2hub
from gpt2hub import generate_text

model = gpt2hub.from_pretrained("gpt2-small")
tokenizer = gpt2hub.load_tokenizer("gpt2-small")
text: str = generate_text(model, tokenizer, "Hi")
texts: list[str] = generate_text(model, tokenizer, ["Hi", "Yo"], 10, stop="\\\\n")
reveal_type(generate_text(model, tokenizer, "Hi", num_return_sequences=3))
"""


def test_generate_text_types_a_str_prompt_as_str_and_a_list_of_prompts_as_a_list(tmp_path):
    """The overloads: `text: str = generate_text(model, tok, "Hi")` type-checks (it was `str | list[str]`). Checked
    against this tree (MYPYPATH), which may be ahead of the installed package."""
    (tmp_path / "probe.py").write_text(TEXT_PROBE)
    (tmp_path / "mypy.ini").write_text("[mypy]\n")
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "MYPYPATH": str(Path(__file__).parents[1])}
    result = subprocess.run([sys.executable, "-m", "mypy", "--config-file", "mypy.ini", "--cache-dir", "cache",
                             "--follow-imports", "silent", "--no-color-output", "probe.py"],  # as for an installed one
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    out = result.stdout + result.stderr
    assert re.search(r'Revealed type is "(builtins\.)?str \| (builtins\.)?list\[(builtins\.)?str\]"', out) or re.search(
        r'Revealed type is "Union\[builtins\.str, builtins\.list\[builtins\.str\]\]"', out), out
    assert "error" not in out and result.returncode == 0, out  # the two annotated assignments type-check
