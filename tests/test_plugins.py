"""Loss plugins: the real example distribution (medcli-polyloss) and fake installed distributions that are
broken in each documented way.  One broken plugin must never break other commands."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers_plugins import GOOD_LOSS, fake_site_on_path

from medcli.errors import PluginError, UnknownNameError, UsageError
from medcli.losses import available_losses, check_loss_name, get_loss, list_losses, plugin_records

pytest_plugins = ("helpers_train",)  # tiny_cohort, shared_cache, train_env


@pytest.fixture
def fake_site(tmp_path, monkeypatch):
    yield from fake_site_on_path(tmp_path, monkeypatch)


def _record(name, check=False):
    return next(r for r in list_losses(check=check) if r.name == name and r.status != "builtin")


def _json_rows(result):
    return {(r["name"], r["distribution"]): r for r in json.loads(result.stdout)}


# --- the real example plugin -------------------------------------------------------------------------


def test_example_plugin_is_discovered_without_import():
    record = next(r for r in plugin_records() if r.name == "poly1")
    assert (record.distribution, record.version, record.status) == ("medcli-polyloss", "0.1.0", "unchecked")
    assert record.value == "medcli_polyloss:Poly1CrossEntropy"


def test_example_plugin_checks_ok_and_matches_formula():
    assert _record("poly1", check=True).status == "ok"
    loss = get_loss("Poly1", num_classes=2, class_counts=(10, 30), epsilon=2.0)
    logits = torch.tensor([[1.0, -0.5], [0.2, 0.7], [-1.0, 2.0]])
    target = torch.tensor([0, 1, 0])
    p_t = F.softmax(logits, dim=1).gather(1, target[:, None]).squeeze(1)
    expected = F.cross_entropy(logits, target) + 2.0 * (1 - p_t).mean()
    assert torch.allclose(loss(logits, target), expected)
    assert loss.needs_cosine_head is False and "poly1" in loss.describe()


def test_example_plugin_trains_a_linear_model():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=gen)
    y = (x[:, 1] > 0).long()
    model = torch.nn.Linear(4, 2)
    loss_fn = get_loss("poly1", class_counts=(int((y == 0).sum()), int((y == 1).sum())))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    first = loss_fn(model(x), y).item()
    for _ in range(15):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    assert loss_fn(model(x), y).item() < 0.7 * first


@pytest.mark.slow  # the first 3D convolution of a process pays a one-off warm-up of several seconds
def test_example_plugin_trains_the_tiny_model():
    models = pytest.importorskip("medcli.models")
    torch.manual_seed(0)
    model = models.create_model(depth="tiny")
    x = torch.randn(4, 1, 16, 16, 16)
    y = torch.tensor([0, 1, 0, 1])
    loss_fn = get_loss("poly1", class_counts=(2, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_plugin_option_errors_are_usage_errors():
    with pytest.raises(UsageError, match="valid options: epsilon"):
        get_loss("poly1", class_counts=(3, 3), eps=2)
    with pytest.raises(UsageError, match="epsilon must be >= -1"):  # the plugin's ValueError
        get_loss("poly1", class_counts=(3, 3), epsilon=-5)


def test_unknown_name_suggests_plugins_too():
    with pytest.raises(UnknownNameError, match="did you mean 'poly1'"):
        get_loss("poly")


def test_cli_list_and_check(cli):
    result = cli("plugins", "list", "--check", "--json")
    assert result.exit_code == 0, result.output
    rows = _json_rows(result)
    assert rows[("poly1", "medcli-polyloss")]["status"] == "ok"
    assert rows[("ldam", "medcli")]["status"] == "builtin"
    table = cli("plugins", "list")
    assert table.exit_code == 0 and "poly1" in table.stdout and "weighted-ce" in table.stdout
    # `medcli plugins` alone is that list (it printed the group's help, as if nothing were installed).
    alone = cli("plugins")
    assert alone.exit_code == 0 and alone.stdout == table.stdout
    only_plugins = _json_rows(cli("plugins", "list", "--json", "--no-builtins"))
    assert all(dist != "medcli" for _, dist in only_plugins)


def test_disable_plugins(monkeypatch, cli):
    monkeypatch.setenv("MEDCLI_DISABLE_PLUGINS", "1")
    assert "poly1" not in available_losses()
    with pytest.raises(UnknownNameError):
        get_loss("poly1")
    result = cli("plugins", "list", "--json")
    assert result.exit_code == 0
    assert {dist for _, dist in _json_rows(result)} == {"medcli"}
    assert "discovery is off" in result.stderr


# --- fake broken distributions -------------------------------------------------------------------------


def _other_commands_still_work(cli):
    assert cli("--help").exit_code == 0
    assert cli("plugins", "list").exit_code == 0
    assert torch.isfinite(get_loss("ce")(torch.zeros(2, 2), torch.tensor([0, 1])))


def test_import_error_plugin(fake_site, cli):
    module = fake_site.add(
        "medcli-broken", {"broken": "Loss"}, "import not_installed_dependency_xyz\n", "2.3"
    )
    # discovery alone does not import it
    assert _record("broken").status == "unchecked"
    assert module not in sys.modules
    _other_commands_still_work(cli)
    assert module not in sys.modules

    assert check_loss_name("Broken") == "broken"  # the name is fine; only using it imports the code
    assert module not in sys.modules
    with pytest.raises(PluginError) as info:
        get_loss("broken")
    text = str(info.value)
    assert "medcli-broken 2.3" in text and "ModuleNotFoundError" in text
    assert "medcli plugins list --check" in text and "uninstall medcli-broken" in text
    assert info.value.exit_code == 7

    record = _record("broken", check=True)
    assert record.status == "error" and "not_installed_dependency_xyz" in record.error
    assert _record("poly1", check=True).status == "ok"  # the others are still checked

    result = cli("plugins", "list", "--check", "--json")
    assert result.exit_code == 7
    assert _json_rows(result)[("broken", "medcli-broken")]["status"] == "error"  # JSON still complete
    errors = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(errors) == 1 and "1 loss plugin broken: broken (medcli-broken: error)" in errors[0]


@pytest.mark.parametrize(
    "source, attr, message",
    [
        ("def make(*, num_classes, class_counts):\n    return 42\n", "make", "returned a int"),
        ("LOSS = 3\n", "LOSS", "not a class or factory"),
        ("def make(num_classes):\n    return lambda z, y: z.sum()\n", "make", "class_counts"),
    ],
    ids=["returns-int", "not-callable", "wrong-kwargs"],
)
def test_invalid_plugin_at_use(fake_site, cli, source, attr, message):
    fake_site.add("medcli-invalid", {"invalid": attr}, source)
    with pytest.raises(PluginError, match=message) as info:
        get_loss("invalid", class_counts=(3, 3))
    assert "medcli-invalid 1.0" in str(info.value)
    record = _record("invalid", check=True)
    assert record.status == "invalid" and message in record.error
    assert cli("plugins", "list", "--check").exit_code == 7
    _other_commands_still_work(cli)


@pytest.mark.parametrize(
    "body, message",
    [
        ("return (logits - logits).sum(dim=1)", "scalar"),
        ("return logits.sum() * float('nan')", "not finite"),
        ("return torch.tensor(1.0)", "does not depend on the logits"),
    ],
    ids=["vector", "nan", "no-grad"],
)
def test_smoke_test_catches_bad_outputs(fake_site, body, message):
    source = f"import torch\n\ndef make(**kw):\n    def loss(logits, target):\n        {body}\n"
    source += "    return loss\n"
    fake_site.add("medcli-badout", {"badout": "make"}, source)
    record = _record("badout", check=True)
    assert record.status == "invalid" and message in record.error
    # Built for a training, the loss is called once on sample logits too: it stops there, named.
    with pytest.raises(PluginError, match=message) as info:
        get_loss("badout", class_counts=(3, 3))
    assert "plugin loss 'badout' from medcli-badout 1.0 is invalid" in str(info.value)


def test_a_plugins_python_warning_is_one_medcli_warning_line(fake_site, cli):
    """A plugin that warns on import (a deprecated API, say): one `WARNING:` line in medcli's voice naming
    the category and the plugin's file, not Python's two lines with the source of the call."""
    source = "import warnings\nwarnings.warn('uses an old API', UserWarning)\n" + GOOD_LOSS
    module = fake_site.add("medcli-warns", {"warns": "Loss"}, source)
    result = cli("plugins", "list", "--check", "--json")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if "old API" in line]
    assert lines == [f"WARNING: UserWarning: uses an old API ({module}.py:2)"], result.stderr
    assert json.loads(result.stdout)  # stdout stays JSON


def test_a_plugin_loss_failing_when_called_stops_training_before_it_starts(fake_site, cli, train_env):
    """A loss that builds but raises when called (here only with the option a user passed) is a one-line
    plugin error, exit 7, before the first training step: it was a traceback from that step."""
    source = (
        "import torch.nn.functional as F\n\nclass Loss:\n"
        "    def __init__(self, *, num_classes, class_counts, smooth=0.0):\n        self.smooth = smooth\n"
        "    def __call__(self, logits, target):\n"
        "        if self.smooth > 0:\n            raise KeyError('smooth is not implemented yet')\n"
        "        return F.cross_entropy(logits, target)\n"
    )
    fake_site.add("medcli-halfdone", {"halfdone": "Loss"}, source)
    assert get_loss("halfdone", class_counts=(3, 3), smooth=0.0) is not None
    result = cli("train", "--loss", "halfdone", "--loss-opt", "smooth=0.1", "--data", train_env["data"],
                 "--out", train_env["out"], *train_env["tiny"])  # fmt: skip
    assert result.exit_code == 7, result.output
    line = " ".join(result.stderr.split())
    assert "plugin loss 'halfdone' from medcli-halfdone 1.0 fails on sample logits: KeyError" in line
    assert "Traceback" not in result.output and "epoch 1/" not in result.output
    assert not list(train_env["out"].rglob("*.pt"))


def test_plain_callable_plugin_is_wrapped(fake_site):
    source = (
        "import torch.nn.functional as F\n\ndef make(**kw):\n    return lambda z, y: F.cross_entropy(z, y)\n"
    )
    fake_site.add("medcli-fn", {"fnloss": "make"}, source, version="0.2")
    loss = get_loss("fnloss", class_counts=(2, 5))
    logits = torch.tensor([[0.3, -0.3]])
    assert torch.allclose(loss(logits, torch.tensor([1])), F.cross_entropy(logits, torch.tensor([1])))
    assert "medcli-fn 0.2" in loss.describe()
    loss.on_epoch_start(0, 1)  # defaulted hook
    assert _record("fnloss", check=True).status == "ok"


def test_plugin_shadowing_a_builtin_is_never_loaded(fake_site, cli):
    module = fake_site.add("medcli-shadow", {"LDAM": "Loss"}, "raise RuntimeError('must not be imported')\n")
    record = _record("LDAM", check=True)
    assert record.status == "shadowed" and "built-in" in record.error
    assert type(get_loss("ldam", class_counts=(3, 4))).__module__ == "medcli.losses.ldam"
    assert module not in sys.modules
    result = cli("plugins", "list", "--check", "--json")
    assert result.exit_code == 7 and _json_rows(result)[("LDAM", "medcli-shadow")]["status"] == "shadowed"
    assert module not in sys.modules
    _other_commands_still_work(cli)


def test_two_plugins_with_one_name_conflict(fake_site, cli):
    mod_a = fake_site.add("medcli-alpha", {"dup": "Loss"}, GOOD_LOSS, version="1.0")
    mod_b = fake_site.add("medcli-beta", {"Dup": "Loss"}, GOOD_LOSS, version="2.0")
    records = [r for r in plugin_records() if r.key == "dup"]
    assert {r.status for r in records} == {"conflict"} and len(records) == 2
    for fails in (get_loss, check_loss_name):  # check_loss_name: the trainer's up-front check
        with pytest.raises(PluginError) as info:
            fails("dup")
        assert "medcli-alpha 1.0" in str(info.value) and "medcli-beta 2.0" in str(info.value)
    assert mod_a not in sys.modules and mod_b not in sys.modules
    assert "dup" not in [n.lower() for n in available_losses()]
    assert cli("plugins", "list").exit_code == 0  # listing reports, only --check fails
    assert cli("plugins", "list", "--check").exit_code == 7
    _other_commands_still_work(cli)


def test_a_plugin_claiming_the_example_name_conflicts_with_it(fake_site):
    fake_site.add("medcli-poly-fork", {"poly1": "Loss"}, GOOD_LOSS)
    with pytest.raises(PluginError, match="medcli-poly-fork 1.0.*medcli-polyloss 0.1.0"):
        get_loss("poly1")


def test_good_fake_plugin_with_options(fake_site):
    fake_site.add("medcli-good", {"scaled-ce": "Loss"}, GOOD_LOSS)
    loss = get_loss("Scaled_CE", class_counts=(4, 4), scale=3.0)
    logits, target = torch.tensor([[0.5, 0.1]]), torch.tensor([0])
    assert torch.allclose(loss(logits, target), 3 * F.cross_entropy(logits, target))
    with pytest.raises(UsageError, match="valid options: scale"):
        get_loss("scaled-ce", scal=2)


def test_plugin_printing_does_not_corrupt_json(fake_site, cli):
    source = "print('hello from plugin import')\n" + GOOD_LOSS
    fake_site.add("medcli-chatty", {"chatty": "Loss"}, source)
    result = cli("plugins", "list", "--check", "--json")
    assert result.exit_code == 0, result.output
    assert _json_rows(result)[("chatty", "medcli-chatty")]["status"] == "ok"
    assert "hello from plugin import" in result.stderr


@pytest.mark.slow
def test_console_exit_codes_in_a_subprocess(fake_site, medcli_proc):
    fake_site.add("medcli-broken", {"broken": "Loss"}, "raise ImportError('libfoo.so missing')\n")
    ok = medcli_proc("--help", env=fake_site.env())
    assert ok.returncode == 0
    checked = medcli_proc("plugins", "list", "--check", "--json", env=fake_site.env())
    assert checked.returncode == 7, checked.stderr
    rows = {r["name"]: r for r in json.loads(checked.stdout)}
    assert rows["broken"]["status"] == "error" and "libfoo.so missing" in rows["broken"]["error"]
    assert "Traceback" not in checked.stderr
