"""What a person reads during and after training: the not-learning warning, the progress lines
through launchers, the report's data and backbone lines."""
import logging
import math

import pytest

tf = pytest.importorskip("tensorflow")

from data_prep.config import load_config  # noqa: E402
from distributed import learning_check as LC  # noqa: E402
from distributed import progress as P  # noqa: E402
from distributed.report import backbone_note, data_section  # noqa: E402


@pytest.mark.parametrize("loss, k, warns", [(0.70, 2, True), (0.67, 2, True), (0.65, 2, False), (0.05, 2, False),
                                            (1.05, 3, True), (1.00, 3, False), (math.nan, 2, False)])
def test_chance_warning_below_95_percent_of_ln_k_is_learning(loss, k, warns):
    msg = LC.chance_warning(loss, k, 2)
    assert (msg is not None) == warns
    if warns:
        assert f"ln {k} = {math.log(k):.3f}" in msg and "not learning" in msg and "model.weights" in msg


def test_history_check_reads_the_second_finetune_epoch():
    rows = [{"phase": "warmup", "loss": "0.69"}, {"phase": "finetune", "loss": "0.69"}]
    assert LC.history_chance_warning(rows, 2) is None  # only one fine-tune epoch: too early to say
    assert "training loss 0.700" in LC.history_chance_warning(rows + [{"phase": "finetune", "loss": "0.70"}], 2)
    assert LC.history_chance_warning(rows + [{"phase": "finetune", "loss": "0.30"}], 2) is None


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append((record.levelname, record.getMessage()))


@pytest.fixture
def log_lines():
    h = _Lines()
    lg = logging.getLogger("cxr")
    from data_prep.log import get_logger

    get_logger()
    lg.addHandler(h)
    yield h.lines
    lg.removeHandler(h)


def test_learning_check_warns_once_after_two_finetune_epochs(log_lines):
    check = LC.LearningCheck("finetune", 2, multilabel=False)
    for epoch in range(4):
        check.on_epoch_end(epoch, {"loss": 0.69})
    assert [lv for lv, m in log_lines if "not learning" in m] == ["WARNING"]
    LC.LearningCheck("warmup", 2, multilabel=False).on_epoch_end(1, {"loss": 0.69})
    LC.LearningCheck("finetune", 2, multilabel=True).on_epoch_end(1, {"loss": 0.69})
    assert len([m for _, m in log_lines if "not learning" in m]) == 1


def test_progress_live_bar_only_on_a_terminal_without_launcher(monkeypatch):
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    for var in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert P.progress("warmup", 10, 32, root=True) == (1, [])
    assert P.progress("warmup", 10, 32, root=False) == (0, [])
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "0")  # mpirun gives ranks a pseudo-terminal
    verbose, shown = P.progress("warmup", 10, 32, root=True)
    assert verbose == 0 and isinstance(shown[0], P.Progress)


def test_progress_lines_carry_rate_and_eta(log_lines):
    p = P.Progress("finetune", steps=10, images_per_step=32, every_s=0.0)
    p.on_epoch_begin(2)
    p.on_train_batch_end(3, {"loss": 0.5})
    p.on_train_batch_end(9, {"loss": 0.4})  # the last step: the epoch's own line follows
    (level, line), = log_lines
    assert level == "INFO" and line.startswith("finetune epoch 3: step 4/10, loss 0.5000, ")
    assert "img/s, epoch ETA " in line


def test_report_names_conversions_per_kind_and_why_the_backbone():
    man = {"classes": ["No Finding", "Infiltration"], "splits": {}, "skipped": [],
           "converted": [{"image": "a.png", "kind": "aspect"}, {"image": "b.png", "kind": "mode"},
                         {"image": "c.png", "kind": "mode"}]}
    assert "converted: 3 (mode: 2, aspect: 1; each listed in `manifest.json`" in data_section(man)
    assert "learns from random weights" in backbone_note(load_config(None, ["model.backbone=tiny"]).model)
    assert "random initial weights" in backbone_note(load_config(None, ["model.weights=none"]).model)
    assert backbone_note(load_config(None, []).model) == ""
