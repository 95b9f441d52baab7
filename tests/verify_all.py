"""Pytest plugin: run ``verify`` after every successful merge the test suite makes.

    python -m pytest -p verify_all

Every call of ``layerswap_fast.merge`` (the API, and the CLI through it) is followed by a
``layerswap_fast.verify`` of its output with the same options, and every expert a local bulk run
writes is verified in its staging folder before it is published; a mismatch fails the test that made
the merge. Merges that verify cannot judge are skipped and counted: ``allow_non_finite`` (the
reference's norms of NaN are NaN by design) and bulk runs with a custom layout file (which the bulk
write pass does not hand on).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest

COUNTS = {"verified": 0, "skipped": 0}


@pytest.fixture(autouse=True)
def _verify_every_merge(monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        return
    import layerswap_fast as lsf
    from layerswap_fast import api
    from layerswap_fast.options import MergeOptions
    from layerswap_fast.verify import verify

    original = api.merge

    @functools.wraps(original)
    def merge_then_verify(base: Any, safety: Any, expert: Any, out: Any, *, options: Any = None, layout: Any = None,
                          **kwargs: Any) -> Any:
        report = original(base, safety, expert, out, options=options, layout=layout, **kwargs)
        method = {k: v for k, v in kwargs.items() if k in MergeOptions.__dataclass_fields__}
        opts = options.replace(**method) if options is not None and method else options or MergeOptions(**method)
        # (LoRA merges too: the reference reads the adapters itself, and checks an emitted adapter module by module.)
        if opts.allow_non_finite:
            COUNTS["skipped"] += 1
            return report
        result = verify(Path(out), base, safety, expert, options=opts, layout=layout, decisions=kwargs.get("decisions"))
        assert result.ok, result.summary()
        COUNTS["verified"] += 1
        return report

    monkeypatch.setattr(api, "merge", merge_then_verify)
    monkeypatch.setattr(lsf, "merge", merge_then_verify)

    from layerswap_fast import bulk, reference

    finish = bulk.finish_output

    @functools.wraps(finish)
    def finish_then_verify(stage: Path, plan: Any, write: Any, bytes_read: int, opts: Any, inputs: Any, started: float, **kw: Any) -> Any:
        report = finish(stage, plan, write, bytes_read, opts, inputs, started, **kw)
        if opts.allow_non_finite or report.get("layout") not in reference.FAMILIES:
            COUNTS["skipped"] += 1
            return report
        result = verify(stage, *inputs, options=opts)
        assert result.ok, result.summary()
        COUNTS["verified"] += 1
        return report

    monkeypatch.setattr(bulk, "finish_output", finish_then_verify)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    terminalreporter.write_line(f"verify_all: {COUNTS['verified']} merges verified, {COUNTS['skipped']} skipped (allow_non_finite or custom bulk layout)")
