import pytest

import gpt2hub.formats
from gpt2hub import UnknownModelError, model_configs, resolve
from gpt2hub.registry import OPENAI_FILES


@pytest.mark.parametrize("name,size", [
    ("gpt2-small", "124M"), ("124M", "124M"), ("gpt2", "124M"), ("gpt2-small (124M)", "124M"),
    ("openai-community/gpt2", "124M"), ("GPT2-Medium", "355M"), ("355M", "355M"), ("gpt2-large (774M)", "774M"),
    ("openai-community/gpt2-large", "774M"), ("gpt2-xl", "1558M"), ("1558M", "1558M"), ("openai-community/gpt2-xl", "1558M"),
])
def test_names_users_type(name, size):
    assert resolve(name).size == size


@pytest.mark.parametrize("size,dims", [("124M", (768, 12, 12)), ("355M", (1024, 16, 24)), ("774M", (1280, 20, 36)),
                                       ("1558M", (1600, 25, 48))])
def test_hparams(size, dims):
    spec = resolve(size)
    assert (spec.emb_dim, spec.n_heads, spec.n_layers) == dims
    assert spec.hparams()["n_vocab"] == 50257 and spec.hparams()["n_ctx"] == 1024
    assert model_configs[spec.book_key] == {"emb_dim": dims[0], "n_layers": dims[2], "n_heads": dims[1]}


def test_published_data_file_size_follows_from_the_architecture():
    # 124M's model.ckpt.data-00000-of-00001 is 497,759,232 bytes; 355M's is 1,419,292,672
    fmt = gpt2hub.formats.FORMATS["openai"]
    assert fmt.sizes(resolve("124M").arch)["model.ckpt.data-00000-of-00001"] == 497_759_232
    assert fmt.sizes(resolve("355M").arch)["model.ckpt.data-00000-of-00001"] == 1_419_292_672
    assert len(OPENAI_FILES) == 7


@pytest.mark.parametrize("bad,hint", [("gpt2-smal", "gpt2-small"), ("gpt2-mediun", "gpt2-medium"), ("125M", "124M")])
def test_unknown_name_suggests_closest_and_lists_all(bad, hint):
    with pytest.raises(UnknownModelError) as e:
        resolve(bad)
    msg = str(e.value)
    assert f"Did you mean {resolve(hint).name!r}" in msg and "gpt2-xl" in msg and "355M" in msg


@pytest.mark.parametrize("bad", ["../124M", "124M/../../etc", "", "/etc/passwd"])
def test_path_like_names_are_refused(bad):
    with pytest.raises(UnknownModelError):
        resolve(bad)


def test_register_refuses_to_steal_a_name():
    from gpt2hub import ModelSpec, register

    with pytest.raises(ValueError, match="124m"):
        register(ModelSpec("my-model", "124M", "me/my-model", 8, 1, 1))
    spec = register(ModelSpec("my-model", "my-size", "me/my-model", 8, 1, 1))
    assert resolve("me/my-model") is spec and register(spec) is spec  # registering again is harmless
