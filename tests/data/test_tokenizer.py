"""A tokenizer given as a path: what is not a `save_pretrained` directory is said plainly, before torch loads."""

import pytest

from blueberry.data import DataError
from blueberry.data.tokenizer import check_local_tokenizer, load_pretrained


@pytest.mark.parametrize("name", ["bpe", "HuggingFaceTB/SmolLM-135M", "gpt2"])
def test_bpe_and_hub_names_are_left_to_the_loader(name):
    check_local_tokenizer(name)  # no error: a Hub name is not a local path


def test_a_path_that_is_no_tokenizer_directory_is_refused(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    cases = [
        ("./no-such-tokenizer", "tokenizer directory './no-such-tokenizer' does not exist"),
        (str(tmp_path / "tokenizer.json"), "is a file; a local tokenizer is the directory `save_pretrained` writes"),
        (str(tmp_path / "empty"), "holds neither tokenizer.json nor tokenizer_config.json"),
    ]
    for path, says in cases:
        with pytest.raises(DataError) as err:
            check_local_tokenizer(path)
        assert says in str(err.value)


def test_a_tokenizer_directory_in_home_is_found_with_a_tilde(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer_config.json").write_text("{}")
    check_local_tokenizer("~/tok")
    with pytest.raises(DataError, match="'~/nope' does not exist"):
        check_local_tokenizer("~/nope")


def test_a_broken_tokenizer_file_names_the_directory_and_the_cause(tmp_path):
    (tmp_path / "tokenizer.json").write_text("not json")
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    with pytest.raises(DataError, match=f"cannot load tokenizer '{tmp_path}': .*Error"):
        load_pretrained(str(tmp_path))
