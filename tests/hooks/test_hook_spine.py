"""The hooks' shared spine (pycomm/hooks/hook_state.py): one behaviour for every hook."""

import pickle

import pytest
import torch

from pycomm.hooks import DGCState, LGreCoState, ProjectionState, QuantState
from pycomm.hooks.hook_state import (advance_step, bucket_signature, completed_future, put_dense, split_layers,
                                     take_dense, validated_layer_key)
from pycomm.hooks.param_state import ParameterNames


def test_split_layers_and_signature():
    params = [torch.zeros(4, 8), torch.zeros(8), torch.zeros(0, 3), torch.zeros(2, 2), torch.zeros(16, 2)]
    names = ["a", "b", "c", "d", "e"]
    layers, dense = split_layers(params, names, min_numel=16)
    assert layers == [("a", 0, 32, 0), ("e", 44, 32, 0)]  # dim > 1, >= 16 elements: (name, offset, length, 0)
    assert dense == [(32, 8), (40, 4)]               # the rest, the empty parameter left out
    buffer = torch.zeros(76)
    assert bucket_signature(buffer, params) == (76, torch.float32, tuple(id(p) for p in params))
    # Identities, not shapes: equal-shaped parameters that swap places are another layout.
    assert bucket_signature(buffer, params) != bucket_signature(buffer, [params[0], params[1], params[2],
                                                                         params[3], torch.zeros(16, 2)])


def _model():
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 4))


def test_layer_keys_are_checked_alike_by_every_hook():
    assert validated_layer_key("0.weight") == "0.weight"
    for bad in [(0, 1), 3, None, b"0.weight"]:
        with pytest.raises(ValueError, match="layer keys must be"):
            validated_layer_key(bad)
    model = _model()
    names = ParameterNames(model)
    assert validated_layer_key("1.weight", names) == "1.weight"
    with pytest.raises(ValueError, match="no parameter is named"):
        validated_layer_key("2.weight", names)
    quant, dgc = QuantState(min_numel=16), DGCState(min_numel=16)
    quant.set_layer_params({"0.weight": 4})
    dgc.set_layer_params({"0.weight": 0.5})
    assert quant.layer_params == {"0.weight": 4} and dgc.layer_params == {"0.weight": 0.5}
    for state, value in [(quant, 4), (dgc, 0.5)]:
        with pytest.raises(ValueError, match="layer keys must be"):
            state.set_layer_params({(0, 1): value})
        with pytest.raises(ValueError, match="must be a dict"):
            state.set_layer_params([("0.weight", value)])
        state.bind(model)
        with pytest.raises(ValueError, match="no parameter is named"):
            state.set_layer_params({"0.wieght": value})
    # A setting made before bind() is checked against the names when the state is bound.
    for state, value in [(QuantState(), 4), (DGCState(min_numel=16), 0.5)]:
        state.set_layer_params({"9.weight": value})
        with pytest.raises(ValueError, match="no parameter is named"):
            state.bind(model)


class _Bucket:
    def __init__(self, last: bool) -> None:
        self.last = last

    def is_last(self) -> bool:
        return self.last


@pytest.mark.parametrize("state", [QuantState(), DGCState(), ProjectionState()])
def test_every_bucket_of_a_step_sees_the_same_step(state):
    steps = [advance_step(state, _Bucket(last)) for last in (False, False, True, False, True)]
    assert steps == [0, 0, 0, 1, 1] and state.iter == 2


def test_dense_side_channel_round_trip_and_completed_future():
    buffer = torch.arange(10, dtype=torch.float32)
    dense = [(1, 2), (6, 3)]
    small = take_dense(buffer, dense)
    assert small.tolist() == [1, 2, 6, 7, 8]
    small.mul_(-1)
    assert buffer[1] == 1  # a copy
    put_dense(buffer, dense, small)
    assert buffer.tolist() == [0, -1, -2, 3, 4, 5, -6, -7, -8, 9]
    assert take_dense(buffer, []) is None
    fut = completed_future(buffer)
    assert fut.done() and fut.wait() is buffer


@pytest.mark.parametrize("make", [QuantState, DGCState, ProjectionState,
                                  lambda: LGreCoState(family="topk", start_iter=1, period=1, acc_steps=1)])
def test_unpickling_drops_the_group_and_the_observer(make):
    state = make()
    holder = getattr(state, "inner", state)
    holder.observer = lambda *args: None
    restored = pickle.loads(pickle.dumps(state))
    assert getattr(restored, "inner", restored).observer is None and restored.process_group is None
    assert restored.state_dict().keys() == state.state_dict().keys()


@pytest.mark.parametrize("make", [QuantState, DGCState, ProjectionState,
                                  lambda: LGreCoState(family="quant", start_iter=1, period=1, acc_steps=1)])
def test_an_unbound_state_raises_at_its_first_hook_call(make):
    from pycomm.hooks import dgc_hook, lgreco_hook, projection_hook, quantized_allreduce_hook

    state = make()
    hook = {QuantState: quantized_allreduce_hook, DGCState: dgc_hook, ProjectionState: projection_hook,
            LGreCoState: lgreco_hook}[type(state)]
    with pytest.raises(ValueError, match=r"was not bound to a model.*state\.bind\(ddp_model\)"):
        hook(state, _Bucket(True))
    assert state.iter == 0  # nothing ran


def test_unpickling_drops_the_bound_names_and_bind_restores_them():
    model = _model()
    for state in [QuantState(), DGCState(), ProjectionState(),
                  LGreCoState(family="topk", start_iter=1, period=1, acc_steps=1)]:
        state.bind(model)
        assert state.parameter_names is not None
        restored = pickle.loads(pickle.dumps(state))
        assert restored.parameter_names is None
        with pytest.raises(ValueError, match="was not bound to a model"):
            restored._require_names()
        restored.bind(model)
        assert list(restored.parameter_names.params) == ["0.weight", "0.bias", "1.weight", "1.bias"]
