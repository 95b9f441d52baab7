"""Exceptions live in the ``layerswap_fast`` namespace and pickle, also across a process pool."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import pickle

import pytest

import layerswap_fast as lsf

EXCEPTIONS = [lsf.LayerswapError, lsf.InvalidModelError, lsf.IncompatibleModelsError, lsf.NonFiniteTensorError,
              lsf.MemoryBudgetError, lsf.InvalidOptionError, lsf.OutputExistsError]


def _raise(kind: str, message: str) -> None:
    raise getattr(lsf, kind)(message)


@pytest.mark.parametrize("cls", EXCEPTIONS, ids=lambda c: c.__name__)
def test_exceptions_live_in_the_package_and_pickle(cls: type[Exception]) -> None:
    module = __import__(cls.__module__, fromlist=["_"])
    assert cls.__module__.startswith("layerswap_fast") and getattr(module, cls.__name__) is cls
    err = cls("/m/model.safetensors: tensor 'w' is bad")
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is cls and again.args == err.args and isinstance(again, lsf.LayerswapError)


def test_exceptions_cross_process_boundaries() -> None:
    """As a worker pool sends them back: raised in a child, re-raised in the parent with their type."""
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        for cls in EXCEPTIONS:
            with pytest.raises(cls, match="tensor 'w'") as info:
                pool.submit(_raise, cls.__name__, "tensor 'w' is bad").result()
            assert type(info.value) is cls
