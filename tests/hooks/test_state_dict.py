"""Hook state dicts by parameter name: what loads, what is refused and why (issue 13)."""

import io
import logging

import pytest
import torch

from pycomm.hooks import (DGCState, LGreCoState, ProjectionState, QuantState, dgc_hook, lgreco_hook, projection_hook,
                          quantized_allreduce_hook)
from pycomm.hooks.param_state import CheckpointMismatch


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


def _with_params(state, fields):
    sd = state.state_dict()
    sd["params"] = {"0.weight": {f: torch.full((32, 64), 0.5) for f in fields},
                    "2.weight": {f: torch.full((4, 32), -1.0) for f in fields}}
    return sd


STATES = [(lambda: QuantState(bits=4, min_numel=16), ("worker", "server")),
          (lambda: DGCState(density=0.1, min_numel=16), ("u", "v")),
          (lambda: ProjectionState(error_feedback=True), ("residual",))]


@pytest.mark.parametrize("make, fields", STATES)
def test_round_trip_by_name_loads_with_weights_only(make, fields):
    model = _model()
    saved = _with_params(make().bind(model), fields)
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    state = make().bind(model)
    state.load_state_dict(loaded)
    again = state.state_dict()
    assert again["step"] == saved["step"] and again["method"] == saved["method"]
    assert again["params"].keys() == saved["params"].keys()
    for name, tensors in saved["params"].items():
        for field, t in tensors.items():
            assert torch.equal(again["params"][name][field], t), (name, field)


@pytest.mark.parametrize("make, fields", STATES)
def test_strict_load_names_the_first_mismatch(make, fields):
    model = _model()
    good = _with_params(make().bind(model), fields)
    unknown = {**good, "params": {**good["params"], "9.weight": {fields[0]: torch.zeros(3)}}}
    with pytest.raises(CheckpointMismatch, match="parameter '9.weight', which the model does not have"):
        make().bind(model).load_state_dict(unknown)
    reshaped = {**good, "params": {"0.weight": {fields[0]: torch.zeros(64, 32)}}}
    with pytest.raises(CheckpointMismatch, match=r"'0.weight' has shape \(64, 32\), this state expects \(32, 64\)"):
        make().bind(model).load_state_dict(reshaped)
    other = QuantState(min_numel=16) if not isinstance(make(), QuantState) else DGCState(min_numel=16)
    with pytest.raises(CheckpointMismatch, match="the checkpoint is for method"):
        other.bind(model).load_state_dict(good)
    # Bound after loading: the same check runs at bind().
    late = make()
    late.load_state_dict(unknown)
    with pytest.raises(CheckpointMismatch, match="9.weight"):
        late.bind(model)


def test_another_setting_is_a_mismatch_and_strict_false_loads_what_fits(caplog):
    model = _model()
    saved = _with_params(QuantState(bits=2, min_numel=16).bind(model), ("worker", "server"))
    saved["params"]["9.weight"] = {"worker": torch.zeros(3)}
    with pytest.raises(CheckpointMismatch, match="the checkpoint has bits=2, this state has bits=4"):
        QuantState(bits=4, min_numel=16).bind(model).load_state_dict(saved)
    state = QuantState(bits=4, min_numel=16).bind(model)
    with caplog.at_level(logging.WARNING):
        state.load_state_dict(saved, strict=False)
    assert state.bits == 4  # the state keeps its own settings
    assert "bits=2" in caplog.text and "9.weight" in caplog.text
    kept = state.state_dict()["params"]
    assert set(kept) == {"0.weight", "2.weight"} and torch.equal(kept["0.weight"]["worker"], torch.full((32, 64), 0.5))


def test_lgreco_checkpoint_of_another_family_is_refused():
    model = _model()
    quant = LGreCoState(family="quant", min_numel=16).bind(model)
    with pytest.raises(CheckpointMismatch, match="family='quant'"):
        LGreCoState(family="topk", min_numel=16).bind(model).load_state_dict(quant.state_dict())


def test_layer_params_are_keyed_by_parameter_name():
    model = _model()
    quant, dgc = QuantState(min_numel=16).bind(model), DGCState(min_numel=16).bind(model)
    quant.set_layer_params({"0.weight": 8})
    dgc.set_layer_params({"2.weight": 0.5})
    assert quant.layer_params == {"0.weight": 8} and dgc.layer_params == {"2.weight": 0.5}
    with pytest.raises(ValueError, match="no parameter is named '0.wieght'"):
        quant.set_layer_params({"0.wieght": 8})
    with pytest.raises(ValueError, match="layer '0.bias' is not compressed"):
        dgc.set_layer_params({"0.bias": 0.5})
    with pytest.raises(ValueError, match="must be parameter names"):
        quant.set_layer_params({(0, 1): 8})


@pytest.mark.parametrize("state, hook", [(QuantState(), quantized_allreduce_hook), (DGCState(), dgc_hook),
                                         (ProjectionState(), projection_hook), (LGreCoState(), lgreco_hook)])
def test_an_unbound_state_says_how_to_bind_it(state, hook):
    with pytest.raises(ValueError, match=r"was not bound to a model.*state.bind\(ddp_model\)"):
        hook(state, object())
