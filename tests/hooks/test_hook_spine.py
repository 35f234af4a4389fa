"""The hooks' shared spine (pycomm/hooks/hook_state.py): one behaviour for every hook."""

import pickle

import numpy as np
import pytest
import torch

from pycomm.hooks import DGCState, LGreCoState, ProjectionState, QuantState
from pycomm.hooks.hook_state import (advance_step, bucket_signature, completed_future, put_dense, split_layers,
                                     take_dense, validated_layer_key)


def test_split_layers_and_signature():
    params = [torch.zeros(4, 8), torch.zeros(8), torch.zeros(0, 3), torch.zeros(2, 2), torch.zeros(16, 2)]
    layers, dense = split_layers(params, min_numel=16)
    assert layers == [(0, 0, 32), (4, 44, 32)]  # dim > 1 and >= 16 elements: (position, offset, length)
    assert dense == [(32, 8), (40, 4)]           # the rest, the empty parameter left out
    buffer = torch.zeros(76)
    assert bucket_signature(buffer, params) == (76, torch.float32, ((4, 8), (8,), (0, 3), (2, 2), (16, 2)))


def test_layer_keys_are_checked_alike_by_every_hook():
    assert validated_layer_key((np.int64(2), 3)) == (2, 3) and type(validated_layer_key((np.int64(2), 3))[0]) is int
    for bad in [(0,), (0, -1), (True, 0), (0.0, 1), "ab", [0, 1]]:
        with pytest.raises(ValueError, match="layer keys must be"):
            validated_layer_key(bad)
    quant, dgc = QuantState(), DGCState()
    quant.set_layer_params({(np.int64(0), 1): 4})  # QuantState used to accept only int
    dgc.set_layer_params({(np.int64(0), 1): 0.5})
    assert quant.layer_params == {(0, 1): 4} and dgc.layer_params == {(0, 1): 0.5}
    for state, value in [(quant, 4), (dgc, 0.5)]:
        with pytest.raises(ValueError, match="layer keys must be"):
            state.set_layer_params({(0, True): value})
        with pytest.raises(ValueError, match="must be a dict"):
            state.set_layer_params([((0, 1), value)])


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


def test_unpickling_a_state_from_before_per_layer_settings():
    for state, missing in [(QuantState(), ("_layer_params", "_params_version")),
                           (DGCState(), ("_layer_params", "_layer_version"))]:
        old = state.__getstate__()
        for name in missing:
            del old[name]
        restored = type(state).__new__(type(state))
        restored.__setstate__(old)
        assert restored.layer_params == {} and all(hasattr(restored, name) for name in missing)
