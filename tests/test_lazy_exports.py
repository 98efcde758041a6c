"""Package exports loaded on first use: the export is the submodule's object; an unknown name is Python's error."""

import pytest

import blueberry.data
from blueberry.data.prepare import prepare_data


def test_an_export_is_the_submodules_own_object_and_an_unknown_name_an_attribute_error():
    assert blueberry.data.prepare_data is prepare_data
    with pytest.raises(AttributeError, match="module 'blueberry.data' has no attribute 'prepared_data'"):
        blueberry.data.prepared_data  # noqa: B018 (the attribute access is the test)
