"""The guard of tests/deprecation_guard.py: a deprecated call made by our code fails, one made between two
libraries does not, for warnings and for logged notices, and for transformers' real `past_key_values`."""

import logging
import types
import warnings

import pytest
import torch

from tests.deprecation_guard import OurDeprecationError


def _library(name: str, source: str) -> types.ModuleType:
    """A module named `name` (as a third-party package would be), built from source."""
    module = types.ModuleType(name)
    exec(compile(source, f"<{name}>", "exec"), module.__dict__)
    return module


OLD = _library("fakelib.api", """
import logging
import warnings

def old_api():
    warnings.warn("old_api is deprecated, use new_api", FutureWarning)  # attributed to the library itself

def logged_old_api():
    logging.getLogger("transformers.fake").warning("`old` is deprecated, use `new` instead")
""")
OTHER = _library("otherlib.uses", "def calls_old_api(api):\n    api.old_api()\n    api.logged_old_api()\n")


def test_a_deprecated_call_from_our_code_fails_at_the_call_site():
    with pytest.raises(OurDeprecationError, match=r"test_deprecation_guard\.py:\d+ calls a deprecated API"):
        OLD.old_api()
    with pytest.raises(OurDeprecationError, match="`old` is deprecated"):
        OLD.logged_old_api()


def test_a_deprecated_call_between_libraries_is_left_alone(caplog):
    with warnings.catch_warnings(record=True) as seen, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        OTHER.calls_old_api(OLD)
    assert [str(w.message) for w in seen] == ["old_api is deprecated, use new_api"]
    assert "`old` is deprecated" in caplog.text


def test_transformers_deprecated_cache_argument_is_caught(tiny_vlm):
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(OurDeprecationError, match="past_key_values"):
        tiny_vlm.model.lm(input_ids=ids, past_key_values=None, use_cache=True)
    out = tiny_vlm.model.lm(input_ids=ids, use_cache=True)  # the current API passes
    with pytest.raises(OurDeprecationError, match="deprecated"):
        out.past_key_values  # noqa: B018  (the deprecated output attribute only logs)


def test_a_warning_raised_in_our_modules_fails_the_run():
    """pyproject.toml's filterwarnings: any warning attributed to illume/reward/policies is an error."""
    ours = _library("illume.some_module", "import warnings\ndef warn():\n    warnings.warn('from us', UserWarning)\n")
    with pytest.raises(UserWarning, match="from us"):
        ours.warn()
    theirs = _library("somelib.module", "import warnings\ndef warn():\n    warnings.warn('from them', UserWarning)\n")
    with pytest.warns(UserWarning, match="from them"):
        theirs.warn()
