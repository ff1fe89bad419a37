"""The one reader of local text (``lucidlm.texts``): each real file once, a stable order, typed errors."""

import pytest

from lucidlm.errors import DataError
from lucidlm.texts import LICENSES, read_texts, text_files


def test_a_directory_is_its_real_files_once_sorted_by_real_path(tmp_path):
    (tmp_path / "b").write_text("bee")
    (tmp_path / "a").write_text("ay")
    (tmp_path / "0-link").symlink_to(tmp_path / "b")  # sorts first by name, but is "b"
    (tmp_path / "sub").mkdir()  # directories inside are not read
    assert text_files([tmp_path]) == [tmp_path.resolve() / "a", tmp_path.resolve() / "b"]
    assert read_texts([tmp_path]) == "ay\n\nbee"
    assert read_texts([tmp_path / "b", tmp_path]) == "bee\n\nay"  # given files first, each once


def test_missing_and_empty_paths_are_typed_errors_naming_the_flag(tmp_path):
    with pytest.raises(DataError, match=r"nope\.txt does not exist.*\(--texts FILE\)"):
        read_texts([tmp_path / "nope.txt"], "--texts")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no text files in .*empty: give --text FILE"):
        read_texts([tmp_path / "empty"])


@pytest.mark.skipif(not LICENSES.is_dir(), reason=f"{LICENSES} is missing on this machine")
def test_the_default_is_the_license_texts_with_each_link_read_once():
    files = text_files()
    assert files and len(files) == len(set(files)) and all(f.is_file() and not f.is_symlink() for f in files)
    assert read_texts().count("GNU GENERAL PUBLIC LICENSE\n                       Version 3") == 1
