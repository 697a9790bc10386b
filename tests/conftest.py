import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from factory import real_vocab, tiny_spec, write_openai_folder  # noqa: E402
from server import FileServer  # noqa: E402

import gpt2hub.download  # noqa: E402
from gpt2hub.registry import register  # noqa: E402
from gpt2hub.synthetic import write_hf_folder  # noqa: E402

TINY = register(tiny_spec())
TINY_HP = TINY.hparams()
# as TINY, 64 wide: int4's groups of 64 inputs need a width they divide (every GPT-2 size has one)
TINY64 = register(tiny_spec("gpt2-tiny64", "tiny64", d=64))


@pytest.fixture(autouse=True)
def _no_ambient_env(monkeypatch):
    """Tests never inherit the user's cache, mirrors or offline settings."""
    for var in ("GPT2HUB_CACHE", "GPT2HUB_OPENAI_URL", "GPT2HUB_OFFLINE", "HF_HUB_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("GPT2HUB_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """OpenAI's seven files for the tiny test model, the checkpoint written by gpt2hub's writer."""
    folder = tmp_path_factory.mktemp("openai") / TINY.size
    weights = write_openai_folder(folder, TINY_HP, seed=1)
    return folder, weights


@pytest.fixture(scope="session")
def tf_tiny_folder(tmp_path_factory):
    """The same files and weights with the checkpoint written by TensorFlow itself (imports TensorFlow: seconds), for
    the tests whose point is that gpt2hub reads what TensorFlow writes."""
    folder = tmp_path_factory.mktemp("openai-tf") / TINY.size
    weights = write_openai_folder(folder, TINY_HP, seed=1, tensorflow=True)
    return folder, weights


@pytest.fixture(scope="session")
def hf_folder(tiny_folder, tmp_path_factory):
    """The same weights in the layout of openai-community/gpt2 on the Hugging Face Hub."""
    folder = tmp_path_factory.mktemp("hf")
    write_hf_folder(folder, TINY_HP, tiny_folder[1], real_vocab())
    return folder


@pytest.fixture(scope="session")
def tiny64_folder(tmp_path_factory):
    """OpenAI's seven files for gpt2-tiny64."""
    folder = tmp_path_factory.mktemp("openai64") / TINY64.size
    weights = write_openai_folder(folder, TINY64.hparams(), seed=2)
    return folder, weights


@pytest.fixture
def server(tiny_folder, tiny64_folder, hf_folder):
    srv = FileServer()
    for folder, spec in ((tiny_folder[0], TINY), (tiny64_folder[0], TINY64)):
        for f in sorted(folder.iterdir()):
            srv.served.files[f"/{spec.size}/{f.name}"] = f.read_bytes()
    for f in sorted(hf_folder.iterdir()):
        srv.served.files[f"/hf/{TINY.hf_repo}/{f.name}"] = f.read_bytes()
    yield srv
    srv.close()


@pytest.fixture
def read_only(hub_env):
    """Make the cache read-only with a bind mount (root ignores permission bits): `read_only()`; undone after."""
    mounted = []

    def make() -> None:
        proc = subprocess.run(["mount", "--bind", "-o", "ro", str(hub_env), str(hub_env)], capture_output=True)
        if proc.returncode:
            pytest.skip(f"cannot bind-mount read-only here: {proc.stderr.decode()[:100]}")
        mounted.append(hub_env)

    yield make
    for path in mounted:
        subprocess.run(["umount", str(path)], check=True)


@pytest.fixture
def sleeps(monkeypatch):
    """Every backoff the downloader asks for (it then does not sleep)."""
    asked: list[float] = []
    monkeypatch.setattr(gpt2hub.download, "time", types.SimpleNamespace(sleep=asked.append))
    return asked


@pytest.fixture
def hub_env(tmp_path, monkeypatch, server):
    """A fresh cache, OpenAI's bucket and the Hugging Face Hub both served from 127.0.0.1."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("GPT2HUB_CACHE", str(cache))
    monkeypatch.setenv("GPT2HUB_OPENAI_URL", server.url)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    return cache


# The slowest tests (`pytest --durations=0` on the 2-core EPYC): seconds each, from full-size models, subprocesses,
# TensorFlow's import or many ranks. `python -m pytest -m "not slow"` leaves them out (the quick subset, under two
# minutes there); the plain `python -m pytest` (CI) runs them. Tests in files being rewritten elsewhere are named
# here rather than marked in place (file -> test functions, every parametrization included).
SLOW = {
    "test_readme.py": ["test_every_python_block_runs_as_written"],  # full-size gpt2-small, every README block
    "test_typing.py": ["test_mypy_finds_the_installed_package_from_another_folder"],  # a whole mypy run
    "test_kernels.py": ["test_greedy_generation_is_identical_with_and_without_packs"],
    "test_model.py": ["test_greedy_generation_is_identical_with_and_without_onednn"],
    "test_distributed.py": ["test_four_ranks_on_one_node_fetch_each_file_once",  # process groups of 2-4 ranks
                            "test_two_nodes_with_their_own_caches_fetch_once_per_cache",
                            "test_a_cache_shared_by_two_nodes_is_fetched_once_by_rank_0",
                            "test_a_failure_on_the_preparing_rank_is_raised_on_every_rank"],
    "test_tf_checkpoint.py": ["test_multi_block_index_and_other_dtypes",  # TensorFlow: its import alone takes seconds
                              "test_reads_every_variable_as_tensorflow_does",
                              "test_masked_crc_matches_what_tensorflow_stores", "test_our_writer_is_read_by_tensorflow",
                              "test_the_test_checkpoints_written_by_gpt2hub_hold_what_tensorflow_writes"],
    "test_hub.py": ["test_many_processes_on_an_empty_cache_download_once"],
    "test_generate_batch.py": ["test_no_padding_builds_no_mask_per_token", "test_each_padded_row_equals_its_prompt_alone"],
    "test_book_compat.py": ["test_seeded_124m_model_generates_the_books_ids", "test_seeded_124m_model_is_the_books_bit_for_bit",
                            "test_training_from_the_seeded_init_gives_the_books_losses",
                            "test_fine_tuning_untied_pretrained_weights_matches_the_book"],
    "test_generate_api.py": ["test_book_model_seeded_sampling_equals_the_books_loop",
                             "test_compiled_and_wrapped_models_take_the_books_loop",
                             "test_every_function_refuses_a_bad_argument_naming_it"],  # 37 cases
    "test_attacks.py": ["test_lock_file_deleted_mid_download", "test_kill_9_mid_download_then_load_resumes",
                        "test_a_lying_mirror_is_survived_with_an_honest_one_behind_it",  # 14 hostile servers x 2 files
                        "test_a_lying_only_mirror_is_a_one_line_error_naming_the_file"],  # 10 x 2
    "test_export.py": ["test_torch_hub_local_load_is_from_pretrained"],
}


# Whole files left out of the quick subset: hundreds of cheap cases that add up (`pytest --durations=0`, 2-core EPYC):
# the attack suites (hostile servers, links, kill -9, read-only caches, full disks, the load path: 121 s together),
# the fuzzed indexes and vocabularies (8 s), the tables of bad command-line arguments (19 s), whole mypy runs (17 s),
# multi-rank process groups (7 s), ggml_compare's fakes (7 s).
SLOW_FILES = {"test_attacks.py", "test_attacks_identity.py", "test_attacks_quant.py", "test_load_path.py",
              "test_bad_index.py", "test_bad_vocab.py", "test_cli_errors.py", "test_typing.py", "test_distributed.py",
              "test_ggml_compare.py"}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    """Marks the SLOW tests; and CUDA tests, deselected by default (pyproject's addopts) but selected again by a `-m`
    of one's own (`-m "not slow"` replaces the default's), are skipped, saying why, where PyTorch sees no GPU."""
    import torch

    for item in items:
        if item.path.name in SLOW_FILES or item.originalname in SLOW.get(item.path.name, ()):
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("cuda") and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU, and PyTorch sees none here"))



def pytest_configure(config):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    np.set_printoptions(precision=4)
