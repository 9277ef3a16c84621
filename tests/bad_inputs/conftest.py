import pytest


@pytest.fixture(scope="package")
def shared(tmp_path_factory) -> dict:
    """The tiny world every bad-input case reads (built once for the folder; cases never change it)."""
    from tests.bad_inputs.corpus import shared_world

    return shared_world(tmp_path_factory.mktemp("bad-inputs"))
