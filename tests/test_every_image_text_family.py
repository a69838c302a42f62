"""The image-text sweep (tests/multimodal_sweep.py): every model type `AutoModelForImageTextToText` builds is composed
with traditional, btx and bts and checked with an image in the input; each passes the DESIGN invariants or is refused
with a MixtureKitError, and each outcome is the one tests/image_text_expectations.json records (one test a family, so
that a slow family shows by name)."""

from __future__ import annotations

import pytest
import transformers

from multimodal_sweep import NOT_BUILT, image_text_types, read_expectations, sweep

SWEPT_WITH, EXPECTED = read_expectations()
EXPECTED_BY_TYPE = {r.model_type: r for r in EXPECTED}
# The families the harness still cannot build (each is a gap of ours; the list only shrinks).
KNOWN_HARNESS_GAPS: list[str] = []


@pytest.mark.slow
@pytest.mark.parametrize("model_type", image_text_types())
def test_family_keeps_the_invariants_or_is_refused(tmp_path, model_type):
    (result,) = sweep(tmp_path, [model_type])
    assert not result.failures, result.failures
    if SWEPT_WITH != transformers.__version__:  # make test-oldest: outcomes differ by release, failures do not
        return
    expected = EXPECTED_BY_TYPE.get(model_type)
    assert expected is not None, f"{model_type} is not in image_text_expectations.json: python tests/multimodal_sweep.py {model_type}"
    assert (result.built, result.outcomes) == (expected.built, expected.outcomes), (
        f"{model_type} changed: re-sweep it (python tests/multimodal_sweep.py {model_type}) if that is intended")


def test_the_expectations_cover_exactly_the_installed_families():
    if SWEPT_WITH != transformers.__version__:
        pytest.skip(f"the expectations were swept with transformers {SWEPT_WITH}, this is {transformers.__version__}")
    assert list(EXPECTED_BY_TYPE) == image_text_types()


def test_no_family_is_left_unbuilt_by_the_harness():
    """Issue #35: a family without a tiny model is so for a reason of transformers' or of this environment, never of
    the sweep's own harness."""
    unbuilt = [r.model_type for r in EXPECTED if r.built.startswith(NOT_BUILT)]
    assert unbuilt == KNOWN_HARNESS_GAPS, unbuilt
