import pickle

import pytest
import torch

from job.checkpoints import screen_pickle
from registry.errors import DataError


class _Exploit:
    def __reduce__(self):
        return (eval, ("__import__('os').system('touch /tmp/medft-pwned')",))


def test_trainer_state_pickles_pass(tmp_path):
    path = tmp_path / "rng_state.pth"
    torch.save({"python": (3, (1, 2), None), "cpu": torch.get_rng_state(), "x": {"a": [1.0]}}, path)
    screen_pickle(path)


@pytest.mark.parametrize("as_torch", [True, False])
def test_crafted_pickle_is_refused_before_anything_runs(tmp_path, as_torch):
    path = tmp_path / "rng_state.pth"
    if as_torch:
        torch.save({"state": _Exploit()}, path)
    else:
        path.write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(DataError, match="eval"):
        screen_pickle(path)


def test_garbage_is_refused(tmp_path):
    path = tmp_path / "optimizer.pt"
    path.write_bytes(b"\x80\x05not really a pickle")
    with pytest.raises(DataError, match="optimizer.pt"):
        screen_pickle(path)
