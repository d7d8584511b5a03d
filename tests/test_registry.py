"""medcli.registry: case/separator-insensitive lookup and "did you mean" errors (used by losses, models)."""

from __future__ import annotations

import pytest

from medcli.errors import UnknownNameError, UsageError
from medcli.registry import Registry, normalize, suggest, unknown_name_error


@pytest.fixture
def reg():
    r = Registry("loss")
    r.register("weighted-ce", "W")
    r.register("ldam", "L")
    r.register("ldam_drw", "D")
    return r


@pytest.mark.parametrize("raw, norm", [("LDAM", "ldam"), ("Weighted_CE", "weighted-ce"), ("  ce ", "ce")])
def test_normalize(raw, norm):
    assert normalize(raw) == norm


@pytest.mark.parametrize("spelling", ["weighted-ce", "WEIGHTED_CE", "Weighted-Ce", " weighted_ce "])
def test_lookup_ignores_case_and_separators(reg, spelling):
    assert spelling in reg
    assert reg.get(spelling) == "W"


def test_names_keep_the_registered_spelling(reg):
    assert reg.names() == ["ldam", "ldam_drw", "weighted-ce"]
    assert "ldam-drw" in reg and reg.get("LDAM-DRW") == "D"


def test_register_as_decorator_returns_the_function():
    r = Registry("optimizer")

    @r.register("sgd")
    def make_sgd():
        return "sgd!"

    assert make_sgd() == "sgd!" and r.get("SGD") is make_sgd


def test_duplicate_registration_is_refused_even_with_other_spelling(reg):
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("LDAM", "other")
    with pytest.raises(ValueError):
        reg.register("weighted_ce", "other")
    assert reg.get("ldam") == "L"


def test_unknown_name_lists_choices_and_suggests(reg):
    with pytest.raises(UnknownNameError) as info:
        reg.get("ldma")
    err = info.value
    assert isinstance(err, UsageError) and err.exit_code == 2
    assert "unknown loss 'ldma'" in err.message and "ldam, ldam_drw, weighted-ce" in err.message
    assert err.hint.startswith("did you mean 'ldam'")
    assert "did you mean" in str(err)  # the one line the CLI prints carries the hint


def test_no_suggestion_when_nothing_is_close(reg):
    with pytest.raises(UnknownNameError) as info:
        reg.get("xyzzy")
    assert info.value.hint is None


def test_suggest_ranks_best_first_and_normalizes():
    assert suggest("ldma", ["focal", "ldam", "ldam-drw"])[0] == "ldam"
    assert suggest("WEIGHTED", ["ce", "weighted-ce"]) == ["weighted-ce"]
    assert suggest("qqq", ["ce"]) == []
    assert len(suggest("a", ["a1", "a2", "a3", "a4", "a5"], n=2)) <= 2


def test_unknown_name_error_sorts_candidates():
    err = unknown_name_error("model", "resnet51", ["resnet50", "resnet10", "tiny"])
    assert "resnet10, resnet50, tiny" in err.message and "'resnet50'" in err.hint


# Edge cases: non-string names, empty registries, ordering.


def test_non_string_name_is_a_usage_error(reg):
    with pytest.raises(UsageError):
        reg.get(None)


def test_empty_registry_message():
    with pytest.raises(UnknownNameError) as info:
        Registry("layout").get("brats")
    assert not info.value.message.rstrip().endswith(":")


def test_names_sorted_case_insensitively():
    r = Registry("thing")
    r.register("Zeta", 1)
    r.register("alpha", 2)
    assert r.names() == ["alpha", "Zeta"]
