import pytest
from model_sources import FAMILIES, make_source


@pytest.fixture(params=FAMILIES)
def source(request):
    return request.param, make_source(request.param)
