"""What a user of the earlier library (bsbr 0.1.1 and its GitHub converter) meets: the module path of its
classes, and one-line pointers where a name of it is gone or its checkpoint does not fit."""
import pytest
import torch

import bsbr
from bsbr import BSBRModel, TransformerToBSBRConverter, convert_to_bsbr


def test_the_earlier_module_path_gives_the_same_classes():
    from bsbr.bsbr import BSBRAttention, BSBRLayer, BSBRModel as Model

    assert (BSBRAttention, BSBRLayer, Model) == (bsbr.BSBRAttention, bsbr.BSBRLayer, bsbr.BSBRModel)


@pytest.mark.parametrize("name", TransformerToBSBRConverter.EARLIER_METHODS)
def test_the_earlier_converter_methods_point_to_convert(name):
    with pytest.raises(AttributeError, match=r"earlier converter's method: convert\(source\)"):
        getattr(TransformerToBSBRConverter(), name)
    with pytest.raises(AttributeError, match="no attribute 'no_such_method'"):
        TransformerToBSBRConverter().no_such_method


def test_model_name_or_path_points_to_source(monkeypatch):
    monkeypatch.setattr("bsbr.convert.converter.load_source", lambda *a, **k: pytest.fail("a source was loaded"))
    with pytest.raises(TypeError, match="give the model as the first argument, source"):
        convert_to_bsbr(model_name_or_path="gpt2")


def test_an_earlier_checkpoint_is_refused_by_name():
    model = BSBRModel(50, 32, 1, 2, 8, 64)
    earlier = {**model.state_dict(), "pos_encoding.pe": torch.zeros(1, 5000, 32)}
    with pytest.raises(ValueError, match="earlier library's BSBRModel"):
        model.load_state_dict(earlier)
    model.load_state_dict(model.state_dict())  # its own still loads
